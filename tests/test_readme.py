"""The README's decoder-loop snippet runs as written, and prunes the way it says."""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


class Layer(nn.Module):
    """The minimum the snippet assumes of a host layer."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Linear(dim, dim)

    def self_attn_block(self, query, query_pos):
        return query + self.self_attn(query + query_pos, query + query_pos, query)[0]

    def ffn_block(self, query):
        return query + self.ffn(query)


def test_readme_snippet_runs():
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(snippet.strip().splitlines()) < 15
    torch.manual_seed(0)
    num_keys = 400
    scope = {
        "layers": nn.ModuleList(Layer() for _ in range(3)),
        "cls_branches": nn.ModuleList(nn.Linear(32, 10) for _ in range(3)),
        "post_norm": nn.LayerNorm(32),
        "query": torch.zeros(2, 20, 32),
        "query_pos": torch.randn(2, 20, 32),
        "memory": torch.randn(2, num_keys, 32),
        "key_pos": torch.randn(2, num_keys, 32),
        "mask": torch.zeros(2, num_keys, dtype=torch.bool),
    }
    with torch.no_grad():
        exec(snippet, scope)
    assert scope["memory"].shape == (2, num_keys // 8, 32)
    assert scope["key_pos"].shape == (2, num_keys // 8, 32) and scope["mask"].shape == (2, num_keys // 8)
