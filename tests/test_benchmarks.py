"""The benchmark package: its registry, its one record schema, and the lowering facts it reports.

Nothing here times anything: the lowering facts and payloads are read from programs.
"""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import cli, harness, hlo, lowering, registry

TINY = {f"w{i}": jnp.ones((4,), jnp.float32) for i in range(3)}


@pytest.mark.parametrize("name", list(registry.BENCHMARKS))
def test_every_registered_benchmark_loads_and_sizes_itself(name):
    module = registry.load(name)
    for quick in (False, True):
        for platform in ("cpu", "gpu"):
            sizes = module.configure(harness.make_run_config(quick, platform))
            assert dataclasses.is_dataclass(sizes), (name, sizes)
            json.dumps(dataclasses.asdict(sizes))


def test_cli_knows_every_benchmark():
    args = cli.parse_args(["--quick", "--only", *registry.BENCHMARKS], "run.py")
    assert args.quick and args.only == list(registry.BENCHMARKS)
    with pytest.raises(SystemExit):
        cli.parse_args(["--only", "no-such-benchmark"], "run.py")


def test_optax_clip_lowers_branch_free_with_one_reduction_per_leaf():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    facts = lowering.lowering_facts(tx, TINY, TINY)
    assert set(facts) == {"cpu", "cuda", "tpu"}
    for f in facts.values():
        assert (f.case, f.if_, f.while_) == (0, 0, 0)
        assert f.branch_free
        assert f.reduce == len(TINY) and f.reductions_per_leaf == 1.0


def test_lowering_facts_count_conditionals_and_loops():
    def update(updates, state, params=None):
        norm = optax.tree.norm(updates)
        scale = jax.lax.cond(norm > 1.0, lambda: 1.0 / norm, lambda: jnp.float32(1.0))
        steps = jax.lax.while_loop(lambda i: i < 3, lambda i: i + 1, 0)
        return jax.tree.map(lambda u: u * scale * steps, updates), state

    tx = optax.GradientTransformation(lambda params: optax.EmptyState(), update)
    facts = lowering.lowering_facts(tx, TINY, TINY, platforms=("cuda",))["cuda"]
    assert facts.conditionals == 1 and facts.while_ == 1
    assert not facts.branch_free


def test_shape_bytes():
    assert hlo.shape_bytes("f32[4,4,1]{2,1,0}") == 64
    assert hlo.shape_bytes("(f32[], s32[3]{0}, bf16[2,2]{1,0})") == 4 + 12 + 8
    assert hlo.shape_bytes("pred[]") == 1


def test_all_reduce_payload_of_a_psum():
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:4]), ("d",))
    body = jax.shard_map(
        lambda x: jax.lax.psum(jnp.sum(x.reshape(-1, 3), axis=0), "d"),
        mesh=mesh,
        in_specs=P("d"),
        out_specs=P(),
    )
    text = jax.jit(body).lower(jnp.ones((24,), jnp.float32)).compile().as_text()
    facts = lowering.all_reduce_payload(text)
    assert facts["all_reduce"] == 1
    assert facts["all_reduce_bytes"] == 3 * 4
    assert facts["all_reduce_bytes_in_conditional"] == 0


def test_one_record_schema(tmp_path):
    run = harness.make_run_config(True, "cpu")
    session = harness.Session(run, {"platform": "cpu"}, tmp_path / "x.json", ["run.py"])
    session.sizes["lowering"] = lowering.configure(run)
    session.record("lowering", "a", leaves=3, dtype="float32", size_bytes=48, fact="ops")
    session.record("collectives", "b", leaves=None, dtype=None, size_bytes=None, error="e")
    session.target("lowering", "t", "1", True)
    session.write()
    document = json.loads((tmp_path / "x.json").read_text())
    assert document["schema"] == harness.SCHEMA
    assert document["config"]["benchmarks"]["lowering"]["leaves"] == 20
    leading = ["benchmark", "implementation", "leaves", "dtype", "size_bytes"]
    for record in document["records"]:
        assert list(record)[:5] == leading and list(record)[-1] == "machine"
    assert document["targets"] == [
        {"benchmark": "lowering", "target": "t", "figure": "1", "passed": True}
    ]
