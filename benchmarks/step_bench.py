"""One optimizer step of layer-wise entropy AdaMerging: adamerge vs FusionBench vs the floor.

Each call measures ONE configuration in a fresh process and prints one JSON line, so that the peak
resident memory (read by the parent with ``os.wait4``) belongs to that configuration alone::

    python benchmarks/step_bench.py --row adamerge --experts 8 [--tv-dtype bf16] [--mode breakdown]

Rows (identical model, batch, loss, init and optimizer; only the merge machinery differs):

- ``adamerge``    MergedModel(base, pool.task_vectors(), Layer(init=0.3)) + Entropy objective + Adam.
- ``fusionbench`` FusionBench's LayerWiseMergedModel, run the way its AdaMerging loop runs it
                  (``backward(retain_graph=True)``, ``merge_weights()`` after the optimizer step).
                  Needs the fusion-bench venv (``benchmarks/.venv-fusionbench``).
- ``floor``       forward+backward of the base with weight gradients, plus two reduction passes
                  over every stacked task vector (the floor in docs/ARCHITECTURE.md: read every task vector twice).

Modes: ``step`` (one configuration per process: its peak memory, and its step times), ``paired``
(every row for one K in ONE process, their steps taken round-robin so that every row sees the same
neighbours; the step times and ratios of the report come from here; run it with the fusion-bench
venv, which has the same torch and transformers, and adamerge from this checkout) and
``breakdown`` (one row: the step split into merge / forward / model backward / coefficient
backward / optimizer, the peak of the step alone, a torch.profiler op table and, for bf16 task
vectors, the numerical effects).

CPU-seconds (all threads) are reported beside wall time because the project's machines are shared:
with a neighbour busy, wall time stretches with whatever share of the cores we get, while the work
done moves much less. The driver sets ``OMP_WAIT_POLICY=PASSIVE`` so that a thread waiting at an OpenMP
barrier sleeps instead of spinning: with spinning, one busy neighbour made steps 3-10x slower and
CPU time meaningless.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # adamerge from this checkout

THREADS = 2
BATCH, SEQ = 4, 128
INIT, LR = 0.3, 1e-3
DELTA_SCALE = 0.02  # ||tau|| / ||W0|| of every tensor, the regime real fine-tunes live in (docs/ARCHITECTURE.md)
MODEL = dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False)


# ---- the shared set-up: model, experts, batch, loss ------------------------------------------------------------


def make_base(config: dict = MODEL, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa")).eval()
    return model


@torch.no_grad()
def make_expert(base: torch.nn.Module, k: int) -> torch.nn.Module:
    """Base + a seeded random delta of relative size DELTA_SCALE per tensor."""
    expert = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1000 + k)
    for p in expert.parameters():
        rms = p.float().pow(2).mean().sqrt()
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (DELTA_SCALE * rms))
    return expert


def make_batch(vocab: int = MODEL["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean token entropy over all positions (the same maths as adamerge.objectives.base.entropy)."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1).mean()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def proc_status(key: str) -> float:
    """VmRSS / VmHWM of this process in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


QUIET = 0.15  # cores used by other processes below which a step counts as quiet


class BackgroundLoad:
    """Wall time of a block and the cores other processes used meanwhile (/proc/stat minus our CPU time).

    On a shared 2-core machine a busy neighbour stretches every OpenMP barrier of a 2-thread step
    (several times over), so only steps with a quiet machine are comparable.
    """

    def __enter__(self):
        self._busy, self._own, self._t = machine_busy_s(), time.process_time(), time.perf_counter()
        self._faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._t
        self.cpu = time.process_time() - self._own  # CPU-seconds of all our threads
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._faults  # page faults (first touch)
        other = machine_busy_s() - self._busy - self.cpu
        self.cores = max(0.0, other / self.wall)


def machine_busy_s() -> float:
    """CPU-seconds all CPUs spent busy since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Also lowers ru_maxrss: breakdown mode only."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---- the rows: each returns (step, parts) ------------------------------------------------------------------------
# step() runs one full optimizer step and returns the loss; parts() runs the same step split in phases
# and returns {phase: seconds}.


def timed(out: dict, key: str, fn):
    """Run fn, store its CPU-seconds under key (robust on a shared machine) and wall seconds under 'wall:key'."""
    t, c = time.perf_counter(), time.process_time()
    value = fn()
    out[key], out["wall:" + key] = time.process_time() - c, time.perf_counter() - t
    return value


def adamerge_row(k: int, tv_dtype: torch.dtype | None, ids: torch.Tensor):
    from torch.func import functional_call

    from adamerge import ExpertPool, Layer, MergedModel
    from adamerge.objectives.entropy import Entropy

    base = make_base()
    pool = ExpertPool(base, {f"e{i}": (lambda i=i: make_expert(base, i)) for i in range(k)})
    merged = MergedModel(pool.base, pool.task_vectors(dtype=tv_dtype), Layer(init=INIT))
    objective = Entropy()
    optimizer = torch.optim.Adam(merged.granularity.parameters(), lr=LR)
    batch = {"input_ids": ids}  # no position_ids: the objective scores every position

    def step():
        loss = objective.task_loss(merged, "bench", batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def parts():
        t: dict[str, float] = {}
        weights = timed(t, "merge", merged.merged_weights)
        leaves = {n: w.detach().requires_grad_() for n, w in weights.items()}
        loss = timed(t, "forward", lambda: entropy_loss(
            functional_call(merged.base, leaves, (), {"input_ids": ids}, tie_weights=True, strict=False).logits))
        timed(t, "model backward", loss.backward)
        timed(t, "coefficient backward",
              lambda: torch.autograd.backward(list(weights.values()), [leaves[n].grad for n in weights]))
        timed(t, "optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        return t

    return base, merged, step, parts


def fusionbench_row(k: int, ids: torch.Tensor):
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights
    from torch.func import functional_call

    base = make_base()
    experts = [make_expert(base, i) for i in range(k)]  # FusionBench's model pool holds every expert
    n_layers = len([p for p in base.parameters() if p.requires_grad])
    module = LayerWiseMergedModel(get_layer_wise_weights(k, n_layers, init_values=INIT), base, experts,
                                  clamp_weights=False, tie_weights=False, strict=False)
    del experts
    optimizer = torch.optim.Adam([module.merge_weight], lr=LR)
    module.train()
    module.merge_weights()
    live: dict = {}  # FusionBench's loop keeps `logits`/`loss` until the next iteration rebinds them

    def step():
        # fusion_bench/method/adamerging/layer_wise_adamerging.py: test_time_adaptation, one task
        live["logits"] = module(input_ids=ids).logits
        live["loss"] = entropy_loss(live["logits"])
        live["loss"].backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        module.merge_weights()
        return live["loss"].item()

    def parts():
        t: dict[str, float] = {}
        live.clear()
        weights = timed(t, "merge", module.merge_weights)
        weights = {n: w for n, w in weights.items() if w.requires_grad}
        leaves = {n: w.detach().requires_grad_() for n, w in weights.items()}
        loss = timed(t, "forward", lambda: entropy_loss(
            functional_call(module.pretrained_model, leaves, (), {"input_ids": ids}, strict=False).logits))
        timed(t, "model backward", loss.backward)
        timed(t, "coefficient backward",
              lambda: torch.autograd.backward(list(weights.values()), [leaves[n].grad for n in weights]))
        timed(t, "optimizer", lambda: (optimizer.step(), optimizer.zero_grad()))
        module.merge_weights()  # leave a live merged state for the next step(), as FusionBench's loop does
        return t

    return base, module, step, parts


def floor_row(k: int, ids: torch.Tensor):
    from adamerge import ExpertPool

    base = make_base()
    pool = ExpertPool(base, {f"e{i}": (lambda i=i: make_expert(base, i)) for i in range(k)})
    stacks = list(pool.task_vectors().stacks.values())
    base.requires_grad_(True)

    def read_stacks():
        return sum(float(s.sum()) for s in stacks)

    def step():
        loss = entropy_loss(base(input_ids=ids).logits)
        loss.backward()
        read_stacks()  # the merge reads every task vector once ...
        read_stacks()  # ... and the coefficient gradient once more
        base.zero_grad(set_to_none=True)
        return loss.item()

    def parts():
        t: dict[str, float] = {}
        loss = timed(t, "forward", lambda: entropy_loss(base(input_ids=ids).logits))
        timed(t, "model backward", loss.backward)
        timed(t, "read stacks (1st)", read_stacks)
        timed(t, "read stacks (2nd)", read_stacks)
        base.zero_grad(set_to_none=True)
        return t

    return base, stacks, step, parts


# ---- measurements -------------------------------------------------------------------------------------------------


def stack_bytes(k: int, params: int, tv_dtype: torch.dtype | None) -> int:
    return k * params * (2 if tv_dtype == torch.bfloat16 else 4)


def profile_ops(step, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):
            step()
    rows = []
    for e in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:top]:
        rows.append({"op": e.key, "shapes": str(e.input_shapes)[:120], "calls_per_step": e.count // 2,
                     "self_ms_per_step": e.self_cpu_time_total / 2e3})
    return rows


def bf16_numerics(ids: torch.Tensor, k: int) -> dict:
    """What bf16 task vectors change: the compute (same bf16-rounded vectors, fp32 vs bf16 maths)
    and the coefficient (merge_tensor casts it to the stack dtype)."""
    from adamerge import ExpertPool, Layer, MergedModel
    from adamerge.objectives.entropy import Entropy

    base = make_base()
    pool = ExpertPool(base, {f"e{i}": (lambda i=i: make_expert(base, i)) for i in range(k)})
    tv16 = pool.task_vectors(dtype=torch.bfloat16)
    tv32 = tv16.to(dtype=torch.float32)  # the same rounded values, merged in fp32
    out = {}
    grads, losses, merged_w = {}, {}, {}
    for name, tv in (("bf16", tv16), ("fp32", tv32)):
        merged = MergedModel(pool.base, tv, Layer(init=INIT))
        loss = Entropy().task_loss(merged, "bench", {"input_ids": ids})
        loss.backward()
        losses[name] = loss.item()
        grads[name] = torch.cat([p.grad.flatten() for p in merged.granularity.parameters()])
        with torch.no_grad():
            merged_w[name] = {n: w.detach() for n, w in merged.merged_weights().items()}
        del merged
    tau_err, tau_norm = 0.0, 0.0
    for n in merged_w["fp32"]:
        tau_err = max(tau_err, float((merged_w["bf16"][n] - merged_w["fp32"][n]).abs().max()))
        tau_norm = max(tau_norm, float(tv32.stacks[n].abs().max()))
    g16, g32 = grads["bf16"], grads["fp32"]
    out["loss_fp32_maths"], out["loss_bf16_maths"] = losses["fp32"], losses["bf16"]
    out["coef_grad_rel_err"] = float((g16 - g32).norm() / g32.norm())
    out["coef_grad_sign_agreement"] = float((g16.sign() == g32.sign()).float().mean())
    out["merged_weight_max_abs_err"] = tau_err
    out["max_abs_tau"] = tau_norm
    c = torch.tensor(INIT)
    out["coef_as_bf16"] = float(c.to(torch.bfloat16))
    out["bf16_spacing_at_init"] = float(torch.finfo(torch.bfloat16).eps * 2 ** torch.floor(torch.log2(c)))
    # Adam's first steps move a coefficient by ~lr; count how many such steps the bf16 forward sees.
    seen = sum(
        float((c + LR * (s + 1)).to(torch.bfloat16)) != float((c + LR * s).to(torch.bfloat16)) for s in range(20)
    )
    out["of_20_lr_sized_steps_visible_in_bf16"] = int(seen)
    return out


def quiet_runs(fn, args) -> list[tuple]:
    """Call fn until ``args.steps`` calls ran on a quiet machine (at least ``args.steps`` calls; at most
    ``args.max_steps`` calls or ``args.max_seconds``); return (value, wall s, CPU s, others' cores) per call."""
    runs: list[tuple] = []
    deadline = time.monotonic() + args.max_seconds
    while len(runs) < args.steps or (
        sum(r[3] < QUIET for r in runs) < args.steps and len(runs) < args.max_steps and time.monotonic() < deadline
    ):
        with BackgroundLoad() as load:
            value = fn()
        runs.append((value, load.wall, load.cpu, load.cores, load.faults))
    return runs


PAIRED_ROWS = ("floor", "adamerge", "adamerge-bf16", "fusionbench")


def paired(k: int, rounds: int, parts_rounds: int, warmup: int) -> dict:
    """Every row in this process; each round times one step of each row (rotating the order)."""
    ids = make_batch()
    built = {"floor": floor_row(k, ids), "adamerge": adamerge_row(k, None, ids),
             "adamerge-bf16": adamerge_row(k, torch.bfloat16, ids), "fusionbench": fusionbench_row(k, ids)}
    for _, _, step, _ in built.values():
        for _ in range(warmup):
            step()
    steps = {row: [] for row in PAIRED_ROWS}
    parts = {row: [] for row in PAIRED_ROWS}
    for r in range(rounds):
        order = PAIRED_ROWS[r % len(PAIRED_ROWS):] + PAIRED_ROWS[: r % len(PAIRED_ROWS)]
        for row in order:
            with BackgroundLoad() as load:
                built[row][2]()
            steps[row].append((load.wall, load.cpu, load.cores, load.faults))
    for r in range(parts_rounds):
        order = PAIRED_ROWS[r % len(PAIRED_ROWS):] + PAIRED_ROWS[: r % len(PAIRED_ROWS)]
        for row in order:
            parts[row].append(built[row][3]())

    def ratio(a: str, b: str, i: int) -> float:  # median over rounds of the within-round ratio
        return statistics.median(x[i] / y[i] for x, y in zip(steps[a], steps[b], strict=True))

    out = {"experts": k, "rounds": rounds, "rows": {}}
    for row in PAIRED_ROWS:
        wall, cpu, others, faults = zip(*steps[row], strict=True)
        out["rows"][row] = {"step_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
                            "others_cores": statistics.median(others), "page_faults": statistics.median(faults),
                            "step_times": wall, "step_cpu": cpu}
        if parts[row]:
            medians = {key: statistics.median(p[key] for p in parts[row]) for key in parts[row][0]}
            out["rows"][row]["parts_cpu_s"] = {n: v for n, v in medians.items() if not n.startswith("wall:")}
            out["rows"][row]["parts_wall_s"] = {n[5:]: v for n, v in medians.items() if n.startswith("wall:")}
        for ref in ("fusionbench", "floor"):
            out["rows"][row][f"wall_x_{ref}"] = ratio(row, ref, 0)
            out["rows"][row][f"cpu_x_{ref}"] = ratio(row, ref, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", choices=["adamerge", "fusionbench", "floor"], help="(not for --mode paired)")
    parser.add_argument("--experts", type=int, required=True)
    parser.add_argument("--tv-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--mode", choices=["step", "paired", "breakdown"], default="step")
    parser.add_argument("--rounds", type=int, default=8, help="paired mode: timed rounds")
    parser.add_argument("--parts-rounds", type=int, default=0, help="paired mode: rounds of the phase split")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps wanted on a quiet machine")
    parser.add_argument("--max-steps", type=int, default=10, help="give up waiting for quiet steps after this many")
    parser.add_argument("--max-seconds", type=float, default=30, help="... or after this long")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    if args.mode == "paired":
        print(json.dumps(paired(args.experts, args.rounds, args.parts_rounds, args.warmup)))
        return 0
    if args.row is None:
        parser.error("--row is required")
    tv_dtype = torch.bfloat16 if args.tv_dtype == "bf16" else None
    if args.row != "adamerge" and tv_dtype is not None:
        parser.error("--tv-dtype bf16 is an adamerge row")
    ids = make_batch()
    rss_imports = proc_status("VmRSS")

    t0 = time.perf_counter()
    if args.row == "adamerge":
        base, _keep, step, parts = adamerge_row(args.experts, tv_dtype, ids)
    elif args.row == "fusionbench":
        base, _keep, step, parts = fusionbench_row(args.experts, ids)
    else:
        base, _keep, step, parts = floor_row(args.experts, ids)
    params = n_params(base)
    result = {
        "row": args.row + ("-bf16" if tv_dtype is not None else ""), "experts": args.experts, "mode": args.mode,
        "params": params, "model_mb": params * 4 / 1e6, "stack_mb": stack_bytes(args.experts, params, tv_dtype) / 1e6,
        "build_s": time.perf_counter() - t0, "rss_after_imports_mb": rss_imports,
        "hwm_after_build_mb": proc_status("VmHWM"), "rss_after_build_mb": proc_status("VmRSS"),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }

    if args.mode == "step":
        losses = [step() for _ in range(args.warmup)]
        runs = quiet_runs(step, args)
        losses += [r[0] for r in runs]
        times, cpus, others, faults = ([r[i] for r in runs] for i in (1, 2, 3, 4))
        quiet = [t for t, o in zip(times, others, strict=True) if o < QUIET]
        result.update(step_s=statistics.median(times), cpu_s=statistics.median(cpus),
                      quiet_step_s=statistics.median(quiet) if len(quiet) >= args.steps else None,
                      step_s_min=min(times), step_times=times, step_cpu=cpus, step_bg_cores=others, losses=losses,
                      page_faults=statistics.median(faults),
                      hwm_end_mb=proc_status("VmHWM"),
                      ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6)
    else:
        for _ in range(args.warmup):
            step()
        reset_peak()
        rss_before = proc_status("VmRSS")
        for _ in range(2):
            step()
        result["step_peak_above_rss_mb"] = proc_status("VmHWM") - rss_before
        result["rss_steady_mb"] = rss_before
        runs = quiet_runs(parts, args)
        samples = [r[0] for r in runs]
        medians = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        result["parts_cpu_s"] = {k: v for k, v in medians.items() if not k.startswith("wall:")}
        result["parts_wall_s"] = {k[5:]: v for k, v in medians.items() if k.startswith("wall:")}
        result["parts_bg_cores"] = [r[3] for r in runs]
        step()  # leave the same state for the profile
        result["top_ops"] = profile_ops(step)
        if tv_dtype is not None:
            del _keep, step, parts
            result["bf16"] = bf16_numerics(ids, args.experts)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
