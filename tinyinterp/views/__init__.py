"""Self-contained interactive HTML views: attention patterns, token attributions, patching
results, SAE features and run reports.

Each view is an object with ``_repr_html_()`` (it displays inline in Jupyter), ``html()`` (a
whole document) and ``save(path)``. The page carries its own CSS, JavaScript (written here) and
data; nothing is fetched when it is shown, so a saved file opens from disk in any browser,
offline. Several views can share one notebook or page: each is scoped to its own element.

    from tinyinterp import views
    views.attention_view(model, tokens, token_labels=task).save("attention.html")
    views.TokenAttributionView({"IG": ig, "saliency": sal, "occlusion": occ})
    views.PatchingView({"activation": act, "attribution": approx}, token_labels=labels)
    views.feature_view(model, sae_params, tokens, "blocks.0.hook_resid_post", [3, 7])
    views.graph_view(graphs.prune_graph(graph), examples=graphs.feature_examples(...))
    views.ReportView.from_dir("runs/induction").save("runs/induction/report.html")
"""

from tinyinterp.views.attention import AttentionView, attention_view
from tinyinterp.views.attributions import TokenAttributionView
from tinyinterp.views.features import FeatureView, feature_view
from tinyinterp.views.graph import GraphView, graph_view
from tinyinterp.views.patching import PatchingView
from tinyinterp.views.report import ReportView, markdown_to_html

__all__ = ["AttentionView", "attention_view", "TokenAttributionView", "PatchingView",
           "FeatureView", "feature_view", "GraphView", "graph_view", "ReportView",
           "markdown_to_html"]
