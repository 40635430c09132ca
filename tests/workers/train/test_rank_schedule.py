"""Progressive rank growth (``rank_schedule``): the model's function is unchanged at a switch,
the optimizer state carries over, a resumed run grows exactly as an uninterrupted one, and the
published adapter (the final rank) loads with plain PEFT and gives the engine's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load
from test_train_loop import matmul_rel_error
from test_train_methods import adapter_loss
from test_train_pause import PauseAfter
from train_helpers import make_spec

from workers.models.loading import load_base_model, load_tokenizer
from workers.spec import AdapterManifest, Hyperparameters
from workers.storage import download_prefix, get_bytes
from workers.train.errors import TrainingError, TrainingPaused
from workers.train.loop import run_training
from workers.train.methods import train_method
from workers.train.rank_growth import RankGrowth, replace_parameters
from workers.train.report import MemoryReporter

SCHEDULE = [[0, 4], [1, 8], [2, 16]]
# Growth adds exact zeros (B's new columns) to each LoRA product; a BLAS that blocks the longer
# sum differently may still round the same terms in another order: a few fp32 ulp per layer.
FP32_RTOL = 1e-5


def grown_model(tiny_llama_dir, method: str, **hp):
    """A PEFT model of ``method`` with a rank schedule, after three AdamW steps at its first rank
    (so B is no longer zero and the test below compares a real adapter)."""
    from peft import get_peft_model

    torch.manual_seed(0)
    hp = Hyperparameters(rank_schedule=SCHEDULE, target_modules="all-linear", lora_dropout=0.0, **hp)
    m = train_method(method, hp, total_steps=10, model_path=tiny_llama_dir)
    model = get_peft_model(load_base_model(tiny_llama_dir, "nf4" if method == "qlora" else "none", "cpu"),
                           m.config())
    m.wrapped(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return m, model, opt, ids


@pytest.mark.parametrize("method,hp", [("lora", {}), ("lora", {"use_dora": True}),
                                       ("qlora", {"use_rslora": True}), ("lora", {"init_lora_weights": "gaussian"})])
def test_logits_are_identical_just_before_and_after_each_switch(tiny_llama_dir, method, hp):
    m, model, opt, ids = grown_model(tiny_llama_dir, method, **hp)
    layer = m.growth.layers[0]
    scaling = layer.scaling["default"]
    tol = max(FP32_RTOL, 2 * matmul_rel_error(model))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with model.disable_adapter():
            bare = model(input_ids=ids).logits
    scale = before.abs().max().item()
    assert (before - bare).abs().max() > 100 * tol * scale  # the trained adapter matters
    for epoch, rank in SCHEDULE[1:]:
        pairs = m.reshaped(model, epoch=epoch)
        replace_parameters(opt, pairs)
        with torch.no_grad():
            after = model(input_ids=ids).logits
        assert (after - before).abs().max() <= tol * scale, (epoch, rank)
        assert layer.lora_A["default"].weight.shape[0] == layer.lora_B["default"].weight.shape[1] == rank
        assert layer.scaling["default"] == scaling  # one scale, alpha / final rank, the whole run
        before = after
    assert m.reshaped(model, epoch=5) == []  # the last stage lasts
    # The new directions learn: B's new columns get gradients through A's new (non-zero) rows.
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    b = layer.lora_B["default"].weight
    assert b.grad[:, 8:].abs().sum() > 0 and not b[:, 8:].any()


def test_a_grown_adapter_saves_with_the_config_peft_needs(tiny_llama_dir, tmp_path):
    """At each rank, the saved adapter's r and lora_alpha make PEFT compute the run's fixed scale
    (rsLoRA: alpha / sqrt(16) at rank 4 too); at the final rank they are the job's own."""
    from peft import PeftModel

    m, model, opt, ids = grown_model(tiny_llama_dir, "lora", use_rslora=True, lora_alpha=12)
    model.eval()
    for epoch in (0, 1, 2):
        replace_parameters(opt, m.reshaped(model, epoch=epoch))
        model.save_pretrained(tmp_path / f"e{epoch}")
        config = json.loads((tmp_path / f"e{epoch}" / "adapter_config.json").read_text())
        rank = SCHEDULE[epoch][1]
        assert config["r"] == rank and config["lora_alpha"] == pytest.approx(12 * (rank / 16) ** 0.5)
        loaded = PeftModel.from_pretrained(load_base_model(tiny_llama_dir, "none", "cpu"), tmp_path / f"e{epoch}").eval()
        with torch.no_grad():
            got, want = loaded(input_ids=ids).logits, model(input_ids=ids).logits
        assert (got - want).abs().max() <= FP32_RTOL * want.abs().max(), epoch
    assert (config["r"], config["lora_alpha"]) == (16, 12)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def _bnb_paged(params):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.PagedAdamW32bit(params, lr=1e-2, weight_decay=0.0)


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("make", [_adamw, _bnb_paged], ids=["torch_adamw", "bnb_paged_adamw32"])
def test_optimizer_state_carries_over_and_the_new_entries_start_at_zero(make):
    """Trained at rank 4 then grown to 8 = trained at rank 8 all along with the 4 new directions
    frozen (zero gradient: Adam leaves them and their moments at zero) until the switch. A reset
    state (step 1 again) or lost moments would differ at the first step after the switch."""
    g = torch.Generator().manual_seed(0)
    a8, x, y = torch.randn(8, 12, generator=g), torch.randn(12, 5, generator=g), torch.randn(10, 5, generator=g)
    b8 = torch.zeros(10, 8)

    def loss(a, b):
        return ((b @ a @ x - y) ** 2).sum()

    ref_a, ref_b = torch.nn.Parameter(a8.clone()), torch.nn.Parameter(b8.clone())
    ours_a, ours_b = torch.nn.Parameter(a8[:4].clone()), torch.nn.Parameter(b8[:, :4].clone())
    ref, ours = make([ref_a, ref_b]), make([ours_a, ours_b])
    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)) for opt in (ref, ours)]
    for _ in range(3):
        loss(ref_a, ref_b).backward()
        ref_a.grad[4:], ref_b.grad[:, 4:] = 0, 0
        loss(ours_a, ours_b).backward()
        for opt, sched in zip((ref, ours), scheds):
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
    old_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in ours.state[ours_b].items()}
    new_a = torch.nn.Parameter(torch.cat([ours_a.detach(), a8[4:]]))
    new_b = torch.nn.Parameter(torch.cat([ours_b.detach(), torch.zeros(10, 4)], dim=1))
    replace_parameters(ours, [(ours_a, new_a), (ours_b, new_b)])
    assert [id(p) for p in ours.param_groups[0]["params"]] == [id(new_a), id(new_b)]
    assert ours_a not in ours.state and ours_b not in ours.state
    state = ours.state[new_b]
    for k, v in old_state.items():
        if torch.is_tensor(v) and v.shape == (10, 4):  # the moments: old entries kept, new ones zero
            assert state[k].shape == (10, 8) and torch.equal(state[k][:, :4], v) and not state[k][:, 4:].any()
        else:  # the step count
            assert state[k] == v
    for _ in range(2):  # the scheduler carries on with the same group
        loss(ref_a, ref_b).backward()
        loss(new_a, new_b).backward()
        for opt, sched in zip((ref, ours), scheds):
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(1e-2 / 6)
    assert torch.allclose(new_a, ref_a, rtol=0, atol=1e-6) and torch.allclose(new_b, ref_b, rtol=0, atol=1e-6)
    assert new_b[:, 4:].abs().min() > 0  # the new directions moved after the switch


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama_dir):
    """An uninterrupted run: 3 epochs of 4 steps, rank 4 → 8 → 16; (store, spec, reporter, result)."""
    from workers.models.registry import ensure_builtin
    from workers.storage import LocalStore

    store = LocalStore(tmp_path_factory.mktemp("rank-store"))
    ensure_builtin("lorafleet/tiny-llama", store)
    spec = make_spec(store, "job-grow", hp=_HP)
    reporter = MemoryReporter()
    return store, spec, reporter, run_training(spec, store=store, reporter=reporter, device="cpu")


# dropout draws from the RNG the checkpoint saves; r is left out: the schedule's final rank
_HP = {"n_epochs": 3, "lora_dropout": 0.1, "rank_schedule": SCHEDULE}


def _weights(store, spec) -> dict[str, torch.Tensor]:
    return load(get_bytes(store, f"{spec.output_prefix}/adapter_model.safetensors"))


def test_the_run_grows_at_each_epoch_and_publishes_the_final_rank(straight):
    store, spec, reporter, result = straight
    grown = [e.data for e in reporter.events if e.type == "status" and "rank" in (e.data or {})]
    assert [(g["epoch"], g["step"], g["rank"]) for g in grown] == [(1, 4, 8), (2, 8, 16)]
    assert grown[0]["trainable_params"] * 2 == grown[1]["trainable_params"] == result.metrics["trainable_params"]
    weights = _weights(store, spec)
    assert weights and all(16 in w.shape for w in weights.values())
    manifest = AdapterManifest.model_validate_json(get_bytes(store, result.manifest_key))
    assert manifest.hyperparameters.rank_schedule == SCHEDULE and manifest.hyperparameters.r == 16


@pytest.mark.parametrize("at", [4, 6], ids=["before_a_switch", "after_a_switch"])
def test_resume_across_a_switch_is_exact(straight, at):
    """Paused at step 4 (epoch 0's last step: the checkpoint is at rank 4, the switch to 8 happens
    after resuming) or at step 6 (mid-epoch 1: the resumed run must rebuild rank 8 before loading
    the checkpoint); either way the published adapter is the uninterrupted run's, bit for bit."""
    store, reference, _, _ = straight
    spec = make_spec(store, f"job-grow-paused-{at}", hp=_HP)
    first = PauseAfter(at)
    with pytest.raises(TrainingPaused):
        run_training(spec, store=store, reporter=first, device="cpu")
    assert [c.step for c in first.checkpoints] == ([4] if at == 4 else [4, 6])
    state = torch.load(store.root / spec.checkpoint_prefix / f"step-{at:06d}" / "trainer_state.pt", weights_only=True)
    assert state["method"] == {"rank": 4 if at == 4 else 8}
    second = MemoryReporter()
    result = run_training(spec, store=store, reporter=second, device="cpu")
    assert any(f"resumed from checkpoint at step {at}" in e.message for e in second.events)
    assert result.metrics["steps"] == 12
    ours, theirs = _weights(store, spec), _weights(store, reference)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:  # the same process, kernels and order of operations: bitwise
        assert torch.equal(ours[name], theirs[name]), name


def test_published_adapter_loads_with_plain_peft_and_gives_the_engines_logits(straight, tiny_llama_dir, tmp_path):
    from peft import PeftModel

    from workers.serve.base import load_serving_base
    from workers.serve.engine import Engine
    from workers.serve.lora import load_peft_adapter
    from workers.serve.sampling import SamplingParams

    store, spec, _, result = straight
    manifest = AdapterManifest.model_validate_json(get_bytes(store, result.manifest_key))
    directory = download_prefix(store, spec.output_prefix, tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 32)  # the final rank; alpha's default is 2r
    # Plain PEFT reproduces the run's own final eval loss: the published scale is the trained one.
    tuned, bare = adapter_loss(store, spec, manifest, directory, tiny_llama_dir)
    assert tuned == pytest.approx(manifest.metrics["eval_loss"], rel=1e-4)
    assert abs(tuned - bare) > 3e-4 * bare

    class Recording(Engine):  # the engine's own forward; this only keeps the logits it samples from
        def _emit(self, reqs, logits):
            self.logits.append(logits.detach().clone())
            super()._emit(reqs, logits)

    tok = load_tokenizer(tiny_llama_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 6?"}],
                                     add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    engine = Recording(load_serving_base(tiny_llama_dir, device="cpu")[0], max_batch=2, max_len=128, max_rank=16)
    engine.logits = []
    req = engine.generate_batch([prompt], SamplingParams(max_tokens=4, temperature=0),
                                [load_peft_adapter(directory, key="grown", adapter_id="grown")])[0]
    peft = PeftModel.from_pretrained(load_base_model(tiny_llama_dir, "none", "cpu"), directory).eval()
    with torch.no_grad():
        want = peft(input_ids=torch.tensor([prompt + req.output_ids[:-1]])).logits[0, len(prompt) - 1:]
    got = torch.cat(engine.logits)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= FP32_RTOL * 10 * want.abs().max()  # other kernels, same fp32 sums


@pytest.mark.parametrize("hp,why", [
    ({"n_epochs": 2}, "n_epochs=2"),  # the last stage (epoch 2) is never reached
    ({"r": 8}, "r=8"),
    ({"init_lora_weights": "orthogonal"}, "init_lora_weights"),
])
def test_a_spec_the_api_would_refuse_fails_with_its_code(local_store, tiny_llama_dir, hp, why):
    from workers.models.registry import ensure_builtin

    ensure_builtin("lorafleet/tiny-llama", local_store)
    spec = make_spec(local_store, "job-bad-schedule", validation=False, hp={**_HP, **hp})
    with pytest.raises(TrainingError, match=why) as info:
        run_training(spec, store=local_store, reporter=MemoryReporter(), device="cpu")
    assert info.value.code == "invalid_hyperparameters"


def test_growth_never_shrinks(tiny_llama_dir):
    m, model, _, _ = grown_model(tiny_llama_dir, "lora")
    assert isinstance(m.growth, RankGrowth)
    m.reshaped(model, epoch=2)
    with pytest.raises(ValueError, match="only grow"):
        m.growth.grow_to(model, 8)


def _data_parallel_rank(rank: int, port: int, store_root: str, spec_json: str, out: str) -> None:
    """One of two gloo processes: train the whole run, then save this rank's adapter tensors."""
    import torch.distributed as dist

    from workers.spec import TrainJobSpec
    from workers.storage import LocalStore
    from workers.train.loop import World, _Run

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        run = _Run(TrainJobSpec.model_validate_json(spec_json), LocalStore(store_root), MemoryReporter(),
                   "cpu", World(rank=rank, size=2))
        run.prepare()
        run.resume()
        run.train()
        torch.save({n: p.detach() for n, p in run.model.named_parameters() if p.requires_grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_ranks_grow_together_and_stay_in_sync(local_store, tiny_llama_dir, tmp_path):
    """Under DDP the wrapper is rebuilt at each switch: the new parameters' gradients are
    all-reduced like the old ones', so both ranks hold the same adapter at the end."""
    import socket

    import torch.multiprocessing as mp

    from workers.models.registry import ensure_builtin

    ensure_builtin("lorafleet/tiny-llama", local_store)
    spec = make_spec(local_store, "job-grow-ddp", validation=False, hp={**_HP, "batch_size": 4})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_data_parallel_rank, args=(port, str(local_store.root), spec.model_dump_json(), str(tmp_path)), nprocs=2)
    zero, one = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert zero.keys() == one.keys() and zero
    for name in zero:
        assert 16 in zero[name].shape and torch.equal(zero[name], one[name]), name
    assert any(zero[n][:, 8:].any() for n in zero if "lora_B" in n)  # the last stage's columns trained
