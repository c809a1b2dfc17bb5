import msgpack
import numpy as np
import pytest

from mergeplan.errors import PlanFormatError
from mergeplan.plan import FORMAT_VERSION, decode_plan, encode_plan, read_plan, write_plan
from mergeplan.plan.codec import body_digest
from plan_factory import make_plan


def test_roundtrip_preserves_everything_and_bytes_are_canonical():
    plan = make_plan()
    data = encode_plan(plan)
    back = decode_plan(data)
    assert encode_plan(back) == data  # re-encoding the decoded plan gives the same bytes
    t = back.tensor("model.layers.2.self_attn.q_proj.weight")
    orig = plan.tensor(t.name)
    assert t.shape == orig.shape and isinstance(t.shape, tuple)
    assert [c.density for c in t.contributions] == [c.density for c in orig.contributions]
    assert t.relax["scores"].dtype == np.float32
    np.testing.assert_array_equal(t.relax["scores"], orig.relax["scores"])


def test_dict_key_order_does_not_change_bytes():
    a, b = make_plan(), make_plan()
    b.params = dict(reversed(list({"normalize": True, "lambda": 1.0}.items())))
    a.params = {"normalize": True, "lambda": 1.0}
    assert encode_plan(a) == encode_plan(b)


def test_arrays_are_stored_as_binary_not_float_lists():
    plan = make_plan(layers=1)
    body = msgpack.unpackb(encode_plan(plan))[2]
    # 64 float32 scores per tensor are 256 raw bytes, not 64 msgpack floats (9 bytes each)
    n_arrays = sum(1 for t in plan.tensors if t.relax)
    assert len(body) < 9 * 64 * n_arrays + 20_000


def test_newer_version_is_refused_with_upgrade_hint(tmp_path):
    plan = make_plan(layers=1)
    outer = msgpack.unpackb(encode_plan(plan))
    outer[1] = FORMAT_VERSION + 1
    p = tmp_path / "new.plan"
    p.write_bytes(msgpack.packb(outer))
    with pytest.raises(PlanFormatError, match="newer mergeplan.*upgrade"):
        read_plan(p)


@pytest.mark.parametrize("cut", [1, 10, 100, -5])
def test_truncated_plan_is_refused(tmp_path, cut):
    data = encode_plan(make_plan(layers=1))
    p = tmp_path / "t.plan"
    p.write_bytes(data[:cut])
    with pytest.raises(PlanFormatError):
        read_plan(p)


def test_flipped_byte_fails_the_digest(tmp_path):
    data = bytearray(encode_plan(make_plan(layers=1)))
    data[len(data) // 2] ^= 0x01
    p = tmp_path / "c.plan"
    p.write_bytes(bytes(data))
    with pytest.raises(PlanFormatError, match="digest|corrupt"):
        read_plan(p)


def test_write_is_atomic_and_returns_body_digest(tmp_path):
    plan = make_plan(layers=1)
    p = tmp_path / "x.plan"
    digest = write_plan(plan, p)
    assert digest == body_digest(msgpack.unpackb(p.read_bytes())[2])
    assert [f.name for f in tmp_path.iterdir()] == ["x.plan"]


def test_missing_and_non_plan_files(tmp_path):
    with pytest.raises(PlanFormatError, match="not found"):
        read_plan(tmp_path / "nope.plan")
    (tmp_path / "r.yaml").write_text("merge_method: ties\n")
    with pytest.raises(PlanFormatError, match="not a mergeplan plan"):
        read_plan(tmp_path / "r.yaml")


def test_7b_class_three_model_plan_stays_small():
    """Llama-2-7B shapes, 3 task models with magnitude masks and AIM scores: well under 20 MB."""
    from mergeplan.plan import Contribution, ModelRef, Plan, TensorPlan, float32_array

    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
              "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
    models = [ModelRef("base", "base", "b")] + [ModelRef(f"m{i}", "task", f"m{i}") for i in range(3)]
    tensors = []
    for layer in range(32):
        for comp, shape in shapes.items():
            contribs = [Contribution(f"m{i}", 1.0, {"kind": "magnitude", "density": 0.5, "digest": "0" * 32})
                        for i in range(3)]
            relax = {"kind": "aim", "omega": 0.4, "axis": 1, "scores": float32_array(np.ones(shape[1]))}
            tensors.append(TensorPlan(f"model.layers.{layer}.mlp.{comp}.weight", shape, "bfloat16",
                                      contributions=contribs, relax=relax))
    size = len(encode_plan(Plan("ties", models, tensors)))
    assert size < 20_000_000
