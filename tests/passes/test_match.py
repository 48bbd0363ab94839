"""The site matcher, through the public API and on dynamo-captured graphs."""

import pytest
import torch
from torch import nn

import lazypass
from lazypass.config import LazyConfig
from lazypass.passes import ANALYSIS, graph_info, run_passes
from tests.archs import ARCHS


class _MLPOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))  # no residual branch anywhere


def test_model_without_sites_is_a_clear_error():
    model = lazypass.apply(_MLPOnly().eval())
    # eval and no_grad: in train mode, or with trainable weights and grad on, a lazy model runs its
    # original forward
    with torch.no_grad(), pytest.raises(lazypass.NoSitesError, match="residual branches h = x \\+ g \\* F\\(Z\\)"):
        model(torch.randn(2, 4, 8))


@pytest.mark.parametrize("name", ["ref_dit", "pixart", "sd3", "vit"])
def test_dynamo_graphs_give_the_same_sites(name):
    arch = ARCHS[name]
    model = arch.build()
    args, kwargs = arch.inputs(2, 900, 0)
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab, fullgraph=True)(*args, **kwargs)
    gm = run_passes(graphs[0], LazyConfig(), ANALYSIS)
    info = graph_info(gm)
    assert [m.kind for m in info.matches] == arch.kinds
    assert all(m.path.split(".")[0] in ("blocks", "transformer_blocks") for m in info.matches)
    assert (info.timestep is None) == (name == "vit")


def test_joint_attention_is_one_site_with_two_streams():
    arch = ARCHS["sd3"]
    model = lazypass.apply(arch.build())
    args, kwargs = arch.inputs(2, 900, 0)
    sites = lazypass.report(model, *args, print_table=False, **kwargs)
    assert len(sites[0].tokens) == 2 and sites[0].kind == "attn"  # image + text streams
    assert len(sites[3].tokens) == 1  # the last block keeps only the image stream
