"""VoxelMorph on the CPU runs its convolutions on channels-last tensors (faster with oneDNN):
the displacement is that of the plain layout, and the shipped model is left as it was."""
import torch

from deepreglib.methods.base import RunContext
from deepreglib.methods.registry import create_method


def test_channels_last_gives_the_plain_layouts_displacement():
    method = create_method("voxelmorph", "cpu")
    assert method.channels_last
    state = {k: v.clone() for k, v in method.model.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    fixed = torch.rand(1, 1, 32, 48, 32, generator=g)
    moving = torch.roll(fixed, 2, dims=3) * 0.9
    fast = method.run(fixed, moving, None, RunContext()).displacement
    method.channels_last = False
    plain = method.run(fixed, moving, None, RunContext()).displacement
    assert float(plain.abs().max()) > 0.05  # it does deform
    assert torch.allclose(fast, plain, rtol=0, atol=1e-4)
    after = method.model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(p.is_contiguous() for p in method.model.parameters())  # the shared model untouched
