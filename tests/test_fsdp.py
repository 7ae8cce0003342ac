"""--strategy fsdp (PyTorch FSDP2) and --activation_checkpointing, on CPU: gloo, 2 Ray Train workers.

FSDP and DDP run the same arithmetic in a different order (reduce-scatter + sharded AdamW against
all-reduce + replicated AdamW), so their losses agree to fp32 rounding, not bitwise. Resuming FSDP
on the same world size repeats the same operations, so it is bitwise; on another world size the
reduction order changes again, so it agrees to rounding.
"""
import math

import pytest
import torch

from raylm import checkpoint as ckpt
from raylm.model import LLMModel, configure_optimizer_groups, model_config_from
from raylm.train import train
from test_train import assert_same_weights, cfg_for, losses, summary

# 12 steps, 2 workers x micro batch 2 x 2 accumulation steps; clipping (grad_clip 1.0) is active.
RUN = dict(max_steps=12, num_workers=2, micro_batch_size=2)


@pytest.fixture(scope="module")
def straight(ray_session, packed_data, tmp_path_factory):
    """The reference runs, shared by the tests below: FSDP and DDP, 12 steps each."""
    root = tmp_path_factory.mktemp("fsdp")
    train(cfg_for(packed_data, root / "fsdp", strategy="fsdp", **RUN))
    train(cfg_for(packed_data, root / "ddp", strategy="ddp", **RUN))
    return root


def grad_norms(save_dir):
    from raylm.metrics import read_jsonl

    return [r["grad_norm"] for r in read_jsonl(save_dir / "metrics.jsonl") if r.get("grad_norm") is not None]


# ----------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_activation_checkpointing_gives_identical_gradients(precision):
    cfg = model_config_from(None, vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                            max_seq_len=16, dropout=0.1)  # dropout: the recomputed masks must match too
    torch.manual_seed(0)
    model = LLMModel(cfg).train()
    x = torch.randint(0, 64, (4, 16))

    def grads_and_saved(checkpointing: bool):
        model.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        saved = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            with torch.autocast("cpu", dtype=precision or torch.bfloat16, enabled=precision is not None):
                _, loss = model(x, labels=x)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    loss_a, grads_a, saved_a = grads_and_saved(False)
    loss_b, grads_b, saved_b = grads_and_saved(True)
    assert saved_b < saved_a / 2  # the blocks' activations were not kept...
    assert torch.equal(loss_a, loss_b)  # ...and recomputing them changed nothing, bit for bit
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp_16_bit_blocks_get_fp32_rotary_tables_and_recompute_them(tmp_path, precision):
    """--strategy fsdp with 16-bit compute and activation checkpointing (one gloo process): the blocks get
    the residual stream in 16 bits and the rotary tables in fp32, in the forward and when the backward
    recomputes them. (With FSDP2 casting the blocks' inputs, torch 2.11 cast the tables in the forward but
    not in the recomputation: CheckpointError.)"""
    import torch.distributed as dist

    from raylm.train import shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = LLMModel(model_config_from(None, vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                           num_kv_heads=2, max_seq_len=16))
        model.activation_checkpointing = True
        shard_model(model, torch.device("cpu"), 1, precision)
        seen = []
        model.layers[0].register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, args[1].dtype)))
        x = torch.randint(0, 64, (2, 16))
        _, loss = model(x, labels=x)
        loss.backward()
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        assert seen == [(low, torch.float32)] * 2  # the forward, then the recomputation
        assert all(torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_activation_checkpointing_run_has_identical_losses(packed_data, tmp_path):
    train(cfg_for(packed_data, tmp_path / "plain", max_steps=6, launcher="local", micro_batch_size=4))
    train(cfg_for(packed_data, tmp_path / "ckpt", max_steps=6, launcher="local", micro_batch_size=4,
                  activation_checkpointing=True))
    assert losses(tmp_path / "ckpt") == losses(tmp_path / "plain")
    assert_same_weights(tmp_path / "plain" / "final", tmp_path / "ckpt" / "final")


# ----------------------------------------------------------------------------- FSDP on 2 Ray workers


@pytest.mark.ray
def test_fsdp_matches_ddp_and_writes_the_plain_checkpoint_format(straight):
    fsdp, ddp = straight / "fsdp", straight / "ddp"
    s = summary(fsdp)
    assert s["strategy"] == "fsdp" and s["world_size"] == 2 and s["final_step"] == 12
    lf, ld = losses(fsdp), losses(ddp)
    assert lf[-1] < lf[0] - 0.5  # it learns
    assert lf == pytest.approx(ld, rel=1e-5)
    assert grad_norms(fsdp) == pytest.approx(grad_norms(ddp), rel=1e-4)
    assert max(grad_norms(fsdp)) > 1.0  # so clipping (grad_clip 1.0) took part
    assert_same_weights(fsdp / "final", ddp / "final", exact=False)
    # one format for everything: the same weight names, and an optimizer state a plain AdamW loads
    assert ckpt.load_model_state(fsdp / "final").keys() == ckpt.load_model_state(ddp / "final").keys()
    from raylm.evaluate import load_checkpoint

    model = load_checkpoint(str(fsdp / "final")).model
    plain = torch.optim.AdamW(configure_optimizer_groups(model, 0.1))
    plain.load_state_dict(ckpt.load_optimizer_state(fsdp / "final"))
    reference = ckpt.load_optimizer_state(ddp / "final")
    assert plain.state_dict()["param_groups"] == reference["param_groups"]
    for i, st in reference["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(plain.state_dict()["state"][i][key], st[key], rtol=1e-3, atol=1e-7)


@pytest.mark.ray
def test_fsdp_resume_is_bitwise_exact_with_activation_checkpointing(straight, packed_data, tmp_path):
    # steps 7-12 again from the straight run's checkpoint_step_6 (its model and AdamW state gathered
    # on save, sharded again on load), with activation checkpointing on: recomputation changes
    # nothing (see above), so losses and weights must match the straight run's bit for bit
    train(cfg_for(packed_data, tmp_path, strategy="fsdp", activation_checkpointing=True,
                  checkpoint=str(straight / "fsdp" / "checkpoint_step_6"), **RUN))
    assert summary(tmp_path)["start_step"] == 6
    assert losses(tmp_path) == losses(straight / "fsdp")[6:]
    assert_same_weights(straight / "fsdp" / "final", tmp_path / "final")


def test_fsdp_checkpoint_resumes_on_one_worker(straight, packed_data, tmp_path):
    train(cfg_for(packed_data, tmp_path, strategy="fsdp", launcher="local",
                  checkpoint=str(straight / "fsdp" / "checkpoint_step_6"), max_steps=12, micro_batch_size=2))
    s = summary(tmp_path)
    assert s["start_step"] == 6 and s["world_size"] == 1 and s["final_step"] == 12
    assert losses(tmp_path) == pytest.approx(losses(straight / "fsdp")[6:], rel=1e-5)
    assert_same_weights(straight / "fsdp" / "final", tmp_path / "final", exact=False)


@pytest.mark.ray
def test_fsdp_bf16_resumes_a_one_worker_checkpoint(ray_session, tmp_path):
    """World size 1 -> 2 with bf16 (MixedPrecisionPolicy). 5 validation rows over 2 workers with micro
    batch 2 gives rank 0 two evaluation forwards and rank 1 one: FSDP needs both to run two."""
    from conftest import write_packed_dataset

    data = write_packed_dataset(tmp_path / "data", val_rows=5)
    one = tmp_path / "one"
    train(cfg_for(data, one, max_steps=12, launcher="local", micro_batch_size=2, mixed_precision="bf16",
                  save_interval=6))
    two = tmp_path / "two"
    train(cfg_for(data, two, strategy="fsdp", mixed_precision="bf16", checkpoint=str(one / "checkpoint_step_6"),
                  **RUN))
    s = summary(two)
    assert s["start_step"] == 6 and s["world_size"] == 2 and s["nonfinite_steps"] == 0
    assert math.isfinite(s["final_val_loss"])
    # bf16 compute (autocast on one worker, FSDP's policy on two) differs in rounding, not in course
    assert losses(two) == pytest.approx(losses(one)[6:], rel=0.03)
    assert all(t.dtype == torch.float32 for t in ckpt.load_model_state(two / "final").values())


@pytest.mark.ray
def test_fsdp_fp16_trains_with_its_sharded_grad_scaler(ray_session, packed_data, tmp_path):
    """fp16 under FSDP: ShardedGradScaler with the unfused AdamW (the fused kernel rejects that
    scaler's found_inf), the chunked loss head's fp16 weight gradient scaled before its cast."""
    train(cfg_for(packed_data, tmp_path, strategy="fsdp", mixed_precision="fp16", **{**RUN, "max_steps": 6}))
    s = summary(tmp_path)
    assert s["final_step"] == 6 and s["world_size"] == 2
    assert math.isfinite(s["final_val_loss"]) and s["nonfinite_steps"] < 6
    assert all(math.isfinite(x) for x in losses(tmp_path))
