"""The phone-friendly formulations compute what the eager student computes, and lower to XNNPACK whole."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from graphdistill.student import phone_ops  # noqa: E402
from graphdistill.student.model import Student, StudentConfig  # noqa: E402
from graphdistill.student.phone_decode import PhoneDecodeStep, input_names, step_inputs  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*Enum subclass.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*Enum subclass.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:open_text is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:read_text is deprecated:DeprecationWarning"),
]

CFG = dict(
    image_size=64, d_model=32, n_heads=2, enc_layers=2, dec_layers=2, det_layers=1, max_question_len=8,
    max_answer_len=10, mask_size=16, num_queries=4, vocab_size=64, num_classes=5, num_sources=6,
)  # fmt: skip


def _student() -> Student:
    torch.manual_seed(0)
    m = Student(StudentConfig(**CFG)).eval()
    with torch.no_grad():  # non-trivial norms: a wrong decomposition must show
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


def _inputs() -> tuple[Any, Any, Any]:
    torch.manual_seed(1)
    ids = torch.randint(4, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0  # padding in one row: the key bias must hide it exactly as the bool mask does
    ids[0, 5:] = 0
    return torch.randn(2, 3, 64, 64), ids, mask


def test_phone_friendly_encode_and_heads_equal_eager() -> None:
    m = _student()
    img, ids, mask = _inputs()
    with torch.no_grad():
        mem = m.encode(img, ids, mask != 0)
        heads = m.heads(mem)
        with phone_ops.phone_friendly(decompose_norms=True):
            assert phone_ops.active()
            mem_p = m.encode(img, ids, mask)
            heads_p = m.heads(mem_p)
        assert not phone_ops.active()
        torch.testing.assert_close(mem_p, mem, atol=2e-5, rtol=1e-4)
        for k in heads:
            torch.testing.assert_close(heads_p[k], heads[k], atol=2e-5, rtol=1e-4)


def test_layer_norm_decomposition_only_when_asked() -> None:
    ln = torch.nn.LayerNorm(8)
    x = torch.randn(3, 5, 8)
    with phone_ops.phone_friendly(decompose_norms=False):
        traced = torch.export.export(_Norm(ln), (x,)).graph
    assert any("layer_norm" in str(n.target) for n in traced.nodes)
    with phone_ops.phone_friendly(decompose_norms=True):
        traced = torch.export.export(_Norm(ln), (x,)).graph
        torch.testing.assert_close(phone_ops.layer_norm(ln, x), ln(x), atol=1e-5, rtol=1e-5)
    assert not any("layer_norm" in str(n.target) for n in traced.nodes)


class _Norm(torch.nn.Module):
    def __init__(self, ln: Any) -> None:
        super().__init__()
        self.ln = ln

    def forward(self, x: Any) -> Any:
        return phone_ops.layer_norm(self.ln, x)


@pytest.mark.parametrize("fused_norms", [False, True], ids=["executorch-norms", "onnx-norms"])
def test_phone_decode_step_equals_the_students_decode_step(fused_norms: bool) -> None:
    """The exported step (folded norms, cache read without this position, per-layer inputs) against the
    student's own decode_step over a whole answer, as the runner loops: kv_new stored at each position.
    Positions at and after this one hold garbage in the phone step's cache: it must not read them."""
    m = _student()
    img, ids, mask = _inputs()
    step = PhoneDecodeStep(m, fused_norms=fused_norms).eval()
    with torch.no_grad():
        cross = m.cross_kv(m.encode(img[:1], ids[:1], mask[:1] != 0))
        cache = m.empty_cache(1)
        tok = torch.ones(1, 1, dtype=torch.long)
        for pos in range(m.config.max_answer_len):
            p = torch.tensor([pos])
            logits, new = m.decode_step(tok, p, None, cache, cross)
            stale = cache.clone()
            stale[:, :, :, :, pos:] = torch.randn_like(stale[:, :, :, :, pos:])
            logits_p, new_p = step(*step_inputs(tok, p, cross, stale))
            torch.testing.assert_close(logits_p, logits, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(new_p, new, atol=2e-5, rtol=1e-4)
            cache = m.write_kv(cache, new, p)
            tok = logits.argmax(-1, keepdim=True)
    assert len(step_inputs(tok, p, cross, cache)) == len(input_names(m.config.dec_layers)) == 2 + 4 * 2


@pytest.mark.slow
def test_decode_step_lowers_to_one_xnnpack_call() -> None:
    """Why phone_ops and phone_decode exist: traced as the student's decode_step, layer norms, bool masks and
    cache writes split a step into many delegate calls around portable kernels; the phone step is one
    XNNPACK call with only its three embedding lookups outside (token, position, the key-mask row)."""
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    m = _student()
    with torch.no_grad():
        ids = torch.ones(1, 8, dtype=torch.long)
        cross = m.cross_kv(m.encode(torch.randn(1, 3, 64, 64), ids, ids != 0))

    class Step(torch.nn.Module):
        def forward(self, tok: Any, pos: Any, cross: Any, cache: Any) -> Any:
            return m.decode_step(tok, pos, None, cache, cross)

    tok, pos = torch.ones(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)

    def top_level_ops(module: Any, example: tuple[Any, ...]) -> Counter[str]:
        with torch.no_grad():
            ep = torch.export.export(module, example)
        edge = to_edge_transform_and_lower({"f": ep}, partitioner=[XnnpackPartitioner()])
        graph = edge.exported_program("f").graph
        return Counter(
            getattr(n.target, "__name__", str(n.target))
            for n in graph.nodes
            if n.op == "call_function" and "getitem" not in str(n.target)
        )

    fused = top_level_ops(Step(), (tok, pos, cross, m.empty_cache(1)))
    phone = top_level_ops(PhoneDecodeStep(m).eval(), step_inputs(tok, pos, cross, m.empty_cache(1)))
    assert phone["executorch_call_delegate"] == 1, phone
    assert fused["executorch_call_delegate"] > 2, fused
    outside = {k for k in phone if k != "executorch_call_delegate" and "view" not in k}
    assert outside == {"aten.embedding.default"} and phone["aten.embedding.default"] == 3, phone


@pytest.mark.slow
def test_int8_quantizes_the_steps_linear_layers_but_not_its_norm_statistics() -> None:
    """PT2E int8 of the exported step: every real linear layer reads int8 weights; the one-row linears that
    compute each norm's mean and variance stay float (one int8 scale for the residual stream would shift
    every norm)."""
    pytest.importorskip("torchao")
    pytest.importorskip("executorch")
    from graphdistill.student.phone_decode import NORM_MEAN
    from graphdistill.student.quantize import quantize_pt2e

    m = _student()
    with torch.no_grad():
        ids = torch.ones(1, 8, dtype=torch.long)
        cross = m.cross_kv(m.encode(torch.randn(1, 3, 64, 64), ids, ids != 0))
    example = step_inputs(
        torch.ones(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), cross, m.empty_cache(1)
    )
    q = quantize_pt2e(PhoneDecodeStep(m).eval(), example, [example])
    stats, layers = [], []
    for n in q.graph.nodes:
        if n.op == "call_function" and "linear" in str(n.target):
            weight = n.args[1]
            (stats if NORM_MEAN in str(weight.target) else layers).append("dequantize" in str(weight.target))
    n_norms = 3 * m.config.dec_layers + 1
    assert stats == [False] * (2 * n_norms)  # mean and variance of every norm, float
    # per layer: qkv, proj, q_x, proj_x, both feed-forward layers; and the output projection
    assert layers == [True] * (6 * m.config.dec_layers + 1)
