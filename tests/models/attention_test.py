"""aem_jax.models.attention: every implementation against a float64 numpy reference."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aem_jax import sharding
from aem_jax.models import attention as A

N, K, H = 4, 2, 8  # GQA: two query heads per key/value head


def reference(q, k, v, q_seg, kv_seg, q_offset, probe):
    """(out, dq, dk, dv) of loss = <out, probe> in float64, by the softmax equations.

    out = P V with P = softmax over allowed keys of q k^T / sqrt(H); a row with
    no allowed key has P = 0. dV = P^T dO, dS = P * (dO V^T - rowsum(P * dO V^T)),
    dQ = dS K / sqrt(H), dK = dS^T Q / sqrt(H), summed over each kv head's group.
    """
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, probe))
    g, t, s, scale = q.shape[1] // k.shape[1], q.shape[2], k.shape[2], q.shape[3] ** -0.5
    k_, v_ = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # [B,N,S,H]
    ok = ((np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :])
          & (np.arange(s)[None, :] <= q_offset + np.arange(t)[:, None]))[:, None]
    scores = np.where(ok, np.einsum("bnth,bnsh->bnts", q, k_) * scale, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    w = np.where(ok, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0)
    p = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    out = p @ v_
    dp = do @ v_.transpose(0, 1, 3, 2)
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    dq = ds @ k_ * scale
    group = lambda x: x.reshape(x.shape[0], k.shape[1], g, *x.shape[2:]).sum(2)
    dk = group(ds.transpose(0, 1, 3, 2) @ q) * scale
    dv = group(p.transpose(0, 1, 3, 2) @ do)
    return out, dq, dk, dv


def inputs(t, s=None, seed=0, dtype=jnp.float32, b=3):
    r = np.random.default_rng(seed)
    s = s or t
    q = jnp.asarray(r.normal(size=(b, N, t, H)), dtype)
    k, v = (jnp.asarray(r.normal(size=(b, K, s, H)), dtype) for _ in "kv")
    return q, k, v, jnp.asarray(r.normal(size=(b, N, t, H)), jnp.float32)


def packed_segments(s, b=3):
    """Rows in turn: right-padded, left-padded, three packed episodes then padding."""
    seg = np.ones((b, s), np.int32)
    seg[0::3, s - 5:] = 0
    seg[1::3, :7] = 0
    seg[2::3, s // 4:] = 2
    seg[2::3, s // 2:] = 3
    seg[2::3, s - 3:] = 0
    return seg


def loss_and_grads(impl, q_offset=0, **kw):
    def loss(q, k, v, q_seg, kv_seg, probe):
        if impl == "blockwise_small":  # small blocks: many blocks, partial last blocks
            out = A._blockwise(q, k, v, q_seg, kv_seg, q_offset, block_q=8, block_k=16)
        else:
            out = A.attend(q, k, v, q_seg, kv_seg, q_offset=q_offset, impl=impl, **kw)
        return jnp.sum(out.astype(jnp.float32) * probe), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def assert_matches(got, want, rtol=1e-5, atol=1e-5):
    (_, out), grads = got
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("impl", ["blockwise", "blockwise_small", "xla", "auto"])
def test_matches_reference_with_padding_and_packed_segments(impl):
    t = 37  # not a multiple of any block
    q, k, v, probe = inputs(t)
    seg = packed_segments(t)
    got = loss_and_grads(impl)(q, k, v, seg, seg, probe)
    assert_matches(got, reference(q, k, v, seg, seg, 0, probe))


def test_blockwise_equals_xla_over_many_blocks():
    t = 300  # two default blocks, the second partial
    q, k, v, probe = inputs(t, seed=1, b=2)
    seg = packed_segments(t, b=2)
    xla = loss_and_grads("xla")(q, k, v, seg, seg, probe)
    blockwise = loss_and_grads("blockwise")(q, k, v, seg, seg, probe)
    assert_matches(blockwise, [xla[0][1], *xla[1]], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["blockwise_small", "xla"])
@pytest.mark.parametrize("traced", [False, True])
def test_decode_offset_with_longer_keys(impl, traced):
    t, s, offset = 5, 40, 21  # queries at slots 21..25 of a 40-slot cache
    q, k, v, probe = inputs(t, s, seed=2)
    kv_seg = packed_segments(s)
    q_seg = kv_seg[:, offset:offset + t]
    if traced:
        fn = jax.jit(lambda i, *a: loss_and_grads(impl, q_offset=i)(*a))
        got = fn(jnp.int32(offset), q, k, v, q_seg, kv_seg, probe)
    else:
        got = loss_and_grads(impl, q_offset=offset)(q, k, v, q_seg, kv_seg, probe)
    assert_matches(got, reference(q, k, v, q_seg, kv_seg, offset, probe))


def test_auto_choice_on_cpu():
    short, long_ = inputs(8, b=1)[0], jnp.zeros((1, N, A.AUTO_BLOCKWISE_MIN_T, H))
    long_k = jnp.zeros((1, K, A.AUTO_BLOCKWISE_MIN_T, H))
    assert A.resolve_impl("auto", short, inputs(8, b=1)[1], 0) == "xla"
    assert A.resolve_impl("auto", long_, long_k, 0) == "blockwise"
    decode_q, cache_k = jnp.zeros((1, N, 1, H)), jnp.zeros((1, K, 4096, H))
    assert A.resolve_impl("auto", decode_q, cache_k, jnp.int32(7)) == "xla"
    # Kernels that cannot express a case fall back to xla.
    assert A.resolve_impl("splash", decode_q, cache_k, jnp.int32(7)) == "xla"
    assert A.resolve_impl("cudnn", long_, long_k, 0) == "xla"  # float32
    assert A.resolve_impl("cudnn", long_.astype(jnp.bfloat16), long_k.astype(jnp.bfloat16), 0) == "cudnn"


def test_fully_masked_rows_are_finite_with_zero_gradient():
    t = 20
    q, k, v, probe = inputs(t, seed=3, b=2)
    kv_seg = np.ones((2, t), np.int32)
    q_seg = kv_seg.copy()
    q_seg[1, 10:] = 5  # no key has segment 5
    for impl in ("blockwise", "blockwise_small", "xla"):
        (_, out), grads = loss_and_grads(impl)(q, k, v, q_seg, kv_seg, probe)
        assert all(np.isfinite(x).all() for x in (out, *grads)), impl
    (_, out), (dq, dk, dv) = loss_and_grads("blockwise")(q, k, v, q_seg, kv_seg, probe)
    np.testing.assert_array_equal(out[1, :, 10:], 0)
    np.testing.assert_array_equal(dq[1, :, 10:], 0)
    want = reference(q, k, v, q_seg, kv_seg, 0, probe)  # masked rows: P = 0, no gradient anywhere
    assert_matches(loss_and_grads("blockwise")(q, k, v, q_seg, kv_seg, probe), want)


def test_bfloat16_blockwise_close_to_float32():
    t = 64
    q, k, v, probe = inputs(t, seed=4, b=1)
    seg = np.ones((1, t), np.int32)
    want = reference(q, k, v, seg, seg, 0, probe)
    got = loss_and_grads("blockwise_small")(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg, seg, probe)
    assert got[0][1].dtype == jnp.bfloat16 and got[1][0].dtype == jnp.bfloat16
    assert_matches(got, want, rtol=0.05, atol=0.05)


def test_bad_impl_names_it_and_the_allowed_ones():
    q, k, v, _ = inputs(4, b=1)
    seg = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match=r"impl='flash'.*'xla'.*'blockwise'.*'splash'.*'cudnn'"):
        A.attend(q, k, v, seg, seg, impl="flash")


def test_cudnn_call_arguments_through_xla():
    """`_cudnn` builds jax.nn.dot_product_attention's layout, mask and scale; run it with XLA."""
    t = 24
    q, k, v, probe = inputs(t, seed=5)
    seg = packed_segments(t)

    def loss(q, k, v):
        out = A._cudnn(q, k, v, seg, seg, implementation="xla")
        return jnp.sum(out * probe), out
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert_matches(got, reference(q, k, v, seg, seg, 0, probe))


def test_splash_kernel_interpreted_on_cpu():
    """The Pallas kernel in interpret mode: segments, GQA, T padded to 128, scaling, gradients."""
    t = 100
    q, k, v, probe = inputs(t, seed=6, b=2)
    q, k, v = (x * 2 for x in (q, k, v))  # sharper softmax
    seg = packed_segments(t, b=2)

    def loss(q, k, v):
        out = A._splash(q, k, v, seg, seg, interpret=True)
        return jnp.sum(out * probe), out
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert_matches(got, reference(q, k, v, seg, seg, 0, probe), rtol=1e-4, atol=1e-4)


def _on_mesh(mesh, q, k, v, seg):
    put = lambda x, names: jax.device_put(x, jax.sharding.NamedSharding(
        mesh, sharding.logical_to_spec(names, shape=x.shape, mesh=mesh)))
    heads, kv_heads = ("batch", "heads", None, None), ("batch", "kv_heads", None, None)
    seg = put(jnp.asarray(seg), ("batch", None))
    return put(q, heads), put(k, kv_heads), put(v, kv_heads), seg, seg


def test_sharded_blockwise_equals_unsharded():
    t = 40
    q, k, v, probe = inputs(t, seed=7, b=4)
    seg = packed_segments(t, b=4)
    want = loss_and_grads("blockwise_small")(q, k, v, seg, seg, probe)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with sharding.use_mesh(mesh):
        got = loss_and_grads("blockwise_small")(*_on_mesh(mesh, q, k, v, seg), probe)
    assert_matches(got, [want[0][1], *want[1]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "tensor": 4}])
def test_sharded_splash_interpreted_equals_reference(shape):
    """shard_map specs: heads split with their kv heads (tensor=2), or kv repeated (tensor=4 > K)."""
    t = 40
    q, k, v, probe = inputs(t, seed=8, b=4)
    seg = packed_segments(t, b=4)
    mesh = sharding.make_mesh(shape)

    def loss(q, k, v, q_seg, kv_seg):
        out = A._splash(q, k, v, q_seg, kv_seg, interpret=True)
        return jnp.sum(out * probe), out
    with sharding.use_mesh(mesh):
        args = _on_mesh(mesh, q, k, v, seg)
        assert "shard_map" in str(jax.make_jaxpr(loss)(*args))
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
    assert_matches(got, reference(q, k, v, seg, seg, 0, probe), rtol=1e-4, atol=1e-4)


_SPLASH_TPU = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P
    from aem_jax import sharding
    from aem_jax.models import attention as A

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    B, N, K, T, H = 4, 8, 2, 8192, 128

    def loss(q, k, v, seg):
        return jnp.sum(A.attend(q, k, v, seg, seg, impl="splash").astype(jnp.float32) ** 2)

    result = {}
    for tensor in (2, 4):  # 4 does not divide K=2: k and v are repeated to N heads
        mesh = sharding.make_mesh({"fsdp": 8 // tensor, "tensor": tensor}, devices=topo.devices)
        heads, rows = NamedSharding(mesh, P(("data", "fsdp"), "tensor")), NamedSharding(mesh, P(("data", "fsdp")))
        kv = NamedSharding(mesh, P(("data", "fsdp"), "tensor" if K % tensor == 0 else None))
        spec = lambda shape, s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=s)
        with sharding.use_mesh(mesh):
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
                spec((B, N, T, H), heads), spec((B, K, T, H), kv), spec((B, K, T, H), kv),
                spec((B, T), rows, jnp.int32)).compile()
        text = compiled.as_text()
        result[tensor] = {"platform": compiled.input_shardings[0][0].mesh.devices.flat[0].platform,
                          "kernels": text.count("tpu_custom_call"),
                          "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2 ** 20}
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_splash_compiles_for_a_v5p_slice():
    """Forward + backward through splash at T=8192, compiled ahead of time for 8 v5p chips."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.skip("libtpu is not installed: no deviceless TPU compilation")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _SPLASH_TPU], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for tensor, r in result.items():
        assert r["platform"] == "tpu", (tensor, r)
        assert r["kernels"] >= 3, (tensor, r)  # forward, dq and dkv kernels are Mosaic calls
        assert r["temp_mib"] < 256, (tensor, r)  # below one head's [T,T] float32 scores (256 MiB)


def test_auto_follows_the_mesh_platform_for_ahead_of_time_compiles():
    """A CPU host compiling for TPU devices (the planner) must get the TPU kernel."""
    from jax._src.mesh import AbstractDevice

    q = jnp.zeros((1, 4, 2048, 64))
    k = jnp.zeros((1, 2, 2048, 64))
    assert A.resolve_impl("auto", q, k, 0) == "blockwise"  # this CPU, no mesh
    tpu = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=AbstractDevice(
        device_kind="TPU v5", num_cores=None, platform="tpu"))
    with jax.sharding.use_abstract_mesh(tpu):
        assert A.platform() == "tpu"
        assert A.resolve_impl("auto", q, k, 0) == "splash"
        assert A.resolve_impl("auto", q, k, 5) == "xla"  # decode steps
