"""Wrappers around a real tiny VLA that make its decoding follow a known rule (shared by the policy and evaluation
tests). The model underneath is real; only the logit of ACTION: is forced."""
import torch


class MarkerAt(torch.nn.Module):
    """The model, except that ACTION: is forced whenever the position of the last token fed is a multiple of 5:
    a rule of each sequence alone, so rows with prompts of different lengths stop writing at different steps."""

    def __init__(self, inner, marker_id):
        super().__init__()
        self.inner, self.marker_id, self.config = inner, marker_id, inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        logits = out.logits.clone()
        logits[kwargs["position_ids"][:, -1] % 5 == 0, -1, self.marker_id] = 1e4
        out.logits = logits
        return out
