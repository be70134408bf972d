"""The phone-friendly formulations compute what the eager student computes, and lower to XNNPACK whole."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from _fixtures import TINY_STUDENT  # noqa: E402
from graphdistill.export.phone_decode import PhoneDecodeStep, input_names, step_inputs  # noqa: E402
from graphdistill.student import phone_ops  # noqa: E402
from graphdistill.student.model import Student, StudentConfig  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*Enum subclass.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*Enum subclass.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:open_text is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:read_text is deprecated:DeprecationWarning"),
]

# the tiny student with two layers a side (a per-layer mistake in the decomposition or the cache must show), the
# 8-token questions and 64-word vocabulary _inputs() draws, 10 answer positions, and five classes, one with no
# token (a live copy path)
CFG = {
    **TINY_STUDENT,
    "enc_layers": 2,
    "dec_layers": 2,
    "max_question_len": 8,
    "max_answer_len": 10,
    "vocab_size": 64,
    "num_classes": 5,
    "class_token_ids": [40, 41, 42, 43, 0],
    "num_sources": 6,
    # each document holds a word twice: the continuation after it depends on the word before
    "source_token_ids": [[5 + i, 12 + i, 30, 31, 12 + i, 45] for i in range(6)],
}


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


def _objects(b: int = 1) -> dict[str, Any]:
    """Teacher-forced objects: two the answer may name (classes 1 and 3), one empty slot, one whose class has
    no token (class 4): a live copy path."""
    return {
        "obj_classes": torch.tensor([[1, 3, -1, 4]] * b),
        "obj_boxes": torch.tensor(
            [[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4], [0, 0, 0, 0], [0.5, 0.5, 0.9, 0.9]]] * b
        ),
        "obj_scores": torch.tensor([[0.9, 0.6, 0.0, 0.5]] * b),
        "obj_valid": torch.tensor([[True, True, False, True]] * b),
    }


def test_phone_friendly_encode_equals_eager() -> None:
    m = _student()
    img, ids, mask = _inputs()
    with torch.no_grad():
        eager = m.encode(img, ids, mask != 0)
        with phone_ops.phone_friendly(decompose_norms=True):
            assert phone_ops.active()
            phone = m.encode(img, ids, mask)
        assert not phone_ops.active()
    assert set(phone) == set(eager) and {"boxes", "keep", "mask_logits", "ptr_keys", "source_logits"} <= set(
        eager
    )
    for k in eager:
        if eager[k].is_floating_point():
            torch.testing.assert_close(phone[k], eager[k], atol=2e-5, rtol=1e-4, msg=k)
        else:  # the selection itself (classes, keep) is identical
            assert torch.equal(phone[k], eager[k]), k


def test_ultralytics_blocks_traced_for_xnnpack_compute_ultralytics_own_forward() -> None:
    """A YOLO11n trunk (its architecture from Ultralytics' own YAML, random weights): inside phone_friendly
    its C3k2/C2PSA/Attention blocks run as slices and 3-D bmm; the numbers are Ultralytics' forward's."""
    pytest.importorskip("ultralytics")
    from ultralytics.nn.modules import block
    from ultralytics.nn.tasks import yaml_model_load

    from graphdistill.student.trunks import UltralyticsTrunk

    torch.manual_seed(0)
    trunk = UltralyticsTrunk(yaml_model_load("yolo11n.yaml"), num_classes=5)
    # batch-norm statistics of these random weights (left at 0/1 the activations fade to ~1e-5 by P3, and
    # any formulation would pass)
    for mod in trunk.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # a plain average over the calibration batches
            mod.reset_running_stats()
    with torch.no_grad():
        for _ in range(3):
            trunk.train()(torch.rand(4, 3, 64, 64))
    trunk.eval()
    kinds = {type(mod).__name__ for mod in trunk.modules()}
    assert {"C3k2", "C2PSA", "Attention"} <= kinds  # the swapped blocks are all in this trunk
    own = {cls: cls.forward for cls in (block.C2f, block.C2PSA, block.Attention)}
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = trunk(x)
        with phone_ops.phone_friendly():
            assert (
                block.C2f.forward is not own[block.C2f]
                and block.Attention.forward is not own[block.Attention]
            )
            got = trunk(x)
    assert {cls: cls.forward for cls in own} == own  # Ultralytics' own forwards are back afterwards
    for g, w in zip(got, want, strict=True):
        assert float(w.std()) > 0.1  # real activations at every level
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


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


def _pointer(m: Student, enc: dict[str, Any]) -> tuple[Any, ...]:
    """encode's copy-path outputs as the exported step takes them (``ptr_keys`` transposed to [1, D, K])."""
    return (enc["ptr_keys"].transpose(1, 2), enc["ptr_bias"], enc["ptr_vocab"], enc["ptr_next"])


def _step_context(m: Student) -> tuple[Any, tuple[Any, ...]]:
    """What a decode step reads besides its token: the cross-attention keys/values and the copy path's inputs,
    for a random picture, an 8-token question and the teacher-forced objects."""
    with torch.no_grad():
        ids = torch.ones(1, 8, dtype=torch.long)
        enc = m.encode(torch.randn(1, 3, 64, 64), ids, ids != 0, _objects())
        return m.cross_kv(enc["memory"]), _pointer(m, enc)


@pytest.mark.parametrize("fused_norms", [False, True], ids=["executorch-norms", "onnx-norms"])
def test_phone_decode_step_equals_the_students_decode_step(fused_norms: bool) -> None:
    """The exported step (folded norms, cache read without this position, per-layer inputs, the copy path's
    mixture) against the student's own decode_step over a whole answer, as the runner loops: kv_new stored at
    each position. Positions at and after this one hold garbage in the phone step's cache: it must not read
    them. The step returns probabilities, the student log-probabilities."""
    m = _student()
    with torch.no_grad():  # copying matters: the generate slot does not take most of the mass, and going on
        m.ptr_gate.bias.fill_(-1.0)  # where a copy left off moves the scores
        m.ptr_cont.weight.normal_(std=0.5)
    img, ids, mask = _inputs()
    step = PhoneDecodeStep(m, fused_norms=fused_norms).eval()
    assert step.copy
    with torch.no_grad():
        enc = m.encode(img[:1], ids[:1], mask[:1] != 0, _objects())
        cross, ptr, pointer = m.cross_kv(enc["memory"]), m.pointer_of(enc), _pointer(m, enc)
        doc_slots = pointer[1][0, m.n_obj :] == 0  # the usable slots of the documents, after the objects'
        doc = pointer[2][0, m.n_obj :][doc_slots].argmax(-1)[:6]
        copied, followed = 0.0, 0.0
        # the step's own greedy answer, then one that starts with a document's words as a copy writes them
        for forced in (torch.zeros(0, dtype=torch.long), doc):
            cache = m.empty_cache(1)
            tok = torch.ones(1, 1, dtype=torch.long)
            prev = tok
            for pos in range(m.config.max_answer_len):
                p = torch.tensor([pos])
                logp, new = m.decode_step(tok, p, None, cache, cross, ptr, prev)
                stale = cache.clone()
                stale[:, :, :, :, pos:] = torch.randn_like(stale[:, :, :, :, pos:])
                probs_p, new_p = step(*step_inputs(tok, p, cross, stale, pointer, prev))
                torch.testing.assert_close(probs_p, logp.exp(), atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(new_p, new, atol=2e-5, rtol=1e-4)
                copied = max(copied, float(probs_p[0, [41, 43]].sum()))
                followed = max(followed, float(pointer[3][0, int(tok)].sum()))  # slots after one holding tok
                cache = m.write_kv(cache, new, p)
                nxt = forced[pos : pos + 1].view(1, 1) if pos < len(forced) else logp.argmax(-1, keepdim=True)
                prev, tok = tok, nxt
            if not len(forced):
                assert float(probs_p[0, 40] + probs_p[0, 42]) < 0.1  # no object of those classes to copy
        assert copied > 0.1  # the objects' class tokens took real mass (beside the documents' words)
        assert followed > 0  # some step read a token a document holds: its continuation was compared
    names = input_names(m.config.dec_layers, copy=True, cont=True)
    assert len(step_inputs(tok, p, cross, cache, pointer)) == len(names) == 2 + 4 * 2 + 5
    assert names[-5:] == ["ptr_keys", "ptr_bias", "ptr_vocab", "ptr_next", "prev_token"]


def test_phone_decode_step_without_objects_returns_the_vocabulary_logits() -> None:
    """A student with text but neither objects nor sources has no copy path: the step is the plain tied output
    layer."""
    torch.manual_seed(0)
    m = Student(StudentConfig(**{**CFG, "outputs": {"answer": "text"}})).eval()
    img, ids, mask = _inputs()
    step = PhoneDecodeStep(m).eval()
    assert not step.copy
    with torch.no_grad():
        cross = m.cross_kv(m.encode(img[:1], ids[:1], mask[:1] != 0)["memory"])
        tok, p = torch.ones(1, 1, dtype=torch.long), torch.tensor([0])
        logp, new = m.decode_step(tok, p, None, m.empty_cache(1), cross)
        logits, new_p = step(*step_inputs(tok, p, cross, m.empty_cache(1)))
    torch.testing.assert_close(logits.log_softmax(-1), logp, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(new_p, new, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="key/value inputs"):
        step(*step_inputs(tok, p, cross, m.empty_cache(1)), torch.zeros(1))


@pytest.mark.slow
def test_decode_step_lowers_to_one_xnnpack_call() -> None:
    """Why phone_ops and phone_decode exist: traced as the student's decode_step, layer norms, bool masks and
    cache writes split a step into many delegate calls around portable kernels; the phone step is one
    XNNPACK call with only its lookups outside: three embeddings (token, position, the key-mask row) and the copy
    slots that follow one holding the token (``ptr_next``)."""
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    m = _student()
    cross, pointer = _step_context(m)

    class Step(torch.nn.Module):
        def forward(
            self,
            tok: Any,
            pos: Any,
            cross: Any,
            cache: Any,
            keys: Any,
            bias: Any,
            vocab: Any,
            nxt: Any,
            prev: Any,
        ) -> Any:
            ptr = {"ptr_keys": keys.transpose(1, 2), "ptr_bias": bias, "ptr_vocab": vocab, "ptr_next": nxt}
            return m.decode_step(tok, pos, None, cache, cross, ptr, prev)

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

    fused = top_level_ops(Step(), (tok, pos, cross, m.empty_cache(1), *pointer, tok))
    phone = top_level_ops(PhoneDecodeStep(m).eval(), step_inputs(tok, pos, cross, m.empty_cache(1), pointer))
    assert phone["executorch_call_delegate"] == 1, phone
    assert fused["executorch_call_delegate"] > 2, fused
    outside = {k for k in phone if k != "executorch_call_delegate" and "view" not in k}
    assert outside == {"aten.embedding.default", "aten.index_select.default"}, phone
    assert phone["aten.embedding.default"] == 3 and phone["aten.index_select.default"] == 2, phone


@pytest.mark.slow
def test_int8_quantizes_the_steps_linear_layers_but_not_its_norm_statistics() -> None:
    """PT2E int8 of the exported step: every real linear layer reads int8 weights; the one-row linears that
    compute each norm's mean and variance stay float (one int8 scale for the residual stream would shift
    every norm)."""
    pytest.importorskip("torchao")
    pytest.importorskip("executorch")
    from graphdistill.export.phone_decode import NORM_MEAN
    from graphdistill.export.quantize import quantize_pt2e

    m = _student()
    cross, pointer = _step_context(m)
    example = step_inputs(
        torch.ones(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), cross, m.empty_cache(1), pointer
    )
    q = quantize_pt2e(PhoneDecodeStep(m).eval(), example, [example])
    stats, layers = [], []
    for n in q.graph.nodes:
        if n.op == "call_function" and "linear" in str(n.target):
            weight = n.args[1]
            (stats if NORM_MEAN in str(weight.target) else layers).append("dequantize" in str(weight.target))
    n_norms = 3 * m.config.dec_layers + 1
    assert stats == [False] * (2 * n_norms)  # mean and variance of every norm, float
    # per layer: qkv, proj, q_x, proj_x, both feed-forward layers; and the output projection (vocabulary
    # logits, the copy path's query and its gate in one)
    assert layers == [True] * (6 * m.config.dec_layers + 1)
