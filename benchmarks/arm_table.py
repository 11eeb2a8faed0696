"""The ARM table: estimated Cortex-A72 (rpi4) / Cortex-A76 (rpi5) time per plate, no board.

    python benchmarks/run.py --target rpi4      # or rpi5; writes docs/benchmarks-arm.md

Builds the TVM variants for the target (fp32 with the packaged default schedules, int8,
``--prune channels``, channels + int8; a tuned row needs records tuned for the board, which
only a board over RPC or an estimate-driven tuner can make),
exports the aarch64 peers' inputs (ONNX Runtime fp32 on the exported graph and on the
channel-folded graph; ncnn; LiteRT with XNNPACK), and estimates each at 1 thread with the
cost instrument (qemu with ``-cpu cortex-a72|cortex-a76`` + llvm-mca). Per target the
results are kept in the work directory; the doc shows every target that has results.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lprnet_edge.compiler.cost.cpus import TARGET_CPU, cpu_model  # noqa: E402
from lprnet_edge.compiler.cost.estimate import (  # noqa: E402
    CAVEATS,
    METHOD,
    CostEstimate,
    Program,
    artifact_program,
    estimate_cycles,
    local_program,
    python_program,
)
from lprnet_edge.compiler.cost.rootfs import VENV, aarch64_rootfs  # noqa: E402

# Peak FP32 FLOP per cycle of one core: the A72's measured 8 (two 64-bit FMA halves per
# 128-bit op), the A76's two 128-bit FMA pipes (16, from its design; not measured here).
PEAK_FLOP_PER_CYCLE = {"cortex-a72": 8, "cortex-a76": 16}
# int8 multiply-accumulates per cycle in the model that weighs the core (llvm-mca): the A72
# (an A57 model) issues one smull/smlal of 8 products per cycle, the A76 (a Neoverse N1
# model) two sdot of 16. Divided by the fp32 FMAs per cycle, the most int8 can gain.
INT8_MACS_PER_CYCLE = {"cortex-a72": 8, "cortex-a76": 32}
# label -> (artifact name suffix, build flags)
TVM_VARIANTS = {
    "TVM fp32 (default schedules)": ("fp32", []),
    # `build --tune` as a user runs it without a board (its default budget, at most 25 min),
    # from an empty database of its own in --work: the tuned goal's row, rpi4 only.
    "TVM fp32 (tuned)": ("fp32-tuned", ["--tune"]),
    "TVM int8": ("int8", ["--quantize", "int8"]),
    "TVM --prune channels": ("channels", ["--prune", "channels"]),
    "TVM channels + int8": ("channels-int8", ["--prune", "channels", "--quantize", "int8"]),
    # The layout is chosen on this core by this row, not by analogy with x86.
    "TVM fp32 --layout NCHW": ("fp32-nchw", ["--layout", "NCHW"]),
}
REFERENCE = "ONNX Runtime fp32"
ORT_FOLDED = "ONNX Runtime fp32, folded graph"
# The peers as a user runs them: the exported graph, each runtime's own converter.
PEERS = ("ONNX Runtime fp32", "ncnn fp32", "LiteRT fp32 (XNNPACK)")
FP32, TUNED, INT8 = "TVM fp32 (default schedules)", "TVM fp32 (tuned)", "TVM int8"
NCHW = "TVM fp32 --layout NCHW"
TUNED_TARGETS = ("rpi4",)


def log(msg: str) -> None:
    print(f"[arm] {msg}", file=sys.stderr, flush=True)


def artifact_dir(target: str, label: str, work: Path) -> Path:
    """Where the TVM variant ``label`` of ``target`` is built in ``work``."""
    return work / f"{target}-{TVM_VARIANTS[label][0]}"


def build_variant(target: str, label: str, work: Path) -> Path:
    """``lprnet-edge build --target T`` of one variant into ``work`` (reused when present)."""
    flags = TVM_VARIANTS[label][1]
    if "--tune" in flags:
        flags = [*flags, "--tuning-db", str(work / f"{target}-tuning-db")]
    out = artifact_dir(target, label, work)
    if (out / "manifest.json").is_file():
        return out
    log(f"building {label} -> {out}")
    with open(out.with_suffix(".log"), "w") as f:
        r = subprocess.run([sys.executable, "-m", "lprnet_edge.cli.main", "build", "--target",
                            target, "-o", str(out), "--force", *flags], stdout=f,
                           stderr=subprocess.STDOUT, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode != 0:
        raise SystemExit(f"building {label} for {target} failed: see {out.with_suffix('.log')}")
    return out


def folded_onnx(work: Path) -> Path:
    """The channel-folded fp32 graph as ONNX: what any runtime could run after our fold."""
    out = work / "lprnet-folded.onnx"
    if out.is_file():
        return out
    import torch

    from lprnet_edge.model.channel_fold import fold_all
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.weights import resolve_weights

    folded, _ = fold_all(load_model(resolve_weights(None)))
    tmp = out.with_suffix(".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(folded.eval(), (torch.zeros(1, 3, 24, 94),), str(tmp),
                          input_names=["x"], output_names=["logits"], opset_version=17,
                          dynamo=False)
    tmp.replace(out)
    return out


def ensure_peers(root: Path) -> None:
    """Install the peer runtimes' aarch64 wheels into the instrument's rootfs when missing
    (``scripts/emulated-pi peers --rootfs``: the rootfs is unpacked afresh when the emulated
    Pi's tarball changes, which drops them)."""
    if (root / VENV.lstrip("/") / ".lprnet-edge-peers").is_file():
        return
    log(f"installing the peer runtimes into {root}")
    r = subprocess.run([str(REPO / "scripts" / "emulated-pi"), "peers", "--rootfs", str(root)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"scripts/emulated-pi peers --rootfs {root} failed:\n{r.stderr[-2000:]}")


def peer_models(work: Path) -> tuple[dict[str, tuple[str, Path]], dict[str, str]]:
    """Each aarch64 peer's runtime and model file (converted on the host the way its own
    tools say), and the peers left out with the reason."""
    from lprnet_edge.model.litert import export_litert
    from lprnet_edge.model.ncnn import export_ncnn
    from lprnet_edge.model.onnx import export_onnx

    models = {REFERENCE: ("onnxruntime", export_onnx().path),
              ORT_FOLDED: ("onnxruntime", folded_onnx(work)),
              "ncnn fp32": ("ncnn", export_ncnn().param)}
    missing = {}
    try:
        models["LiteRT fp32 (XNNPACK)"] = ("litert", export_litert().path)
    except Exception as e:  # noqa: BLE001  (the converter is optional: the row says why)
        missing["LiteRT fp32 (XNNPACK)"] = f"no LiteRT conversion: {str(e).splitlines()[0]}"
    return models, missing


def peer_programs(models: dict[str, tuple[str, Path]], cpu: Any) -> dict[str, Program]:
    """The peers as guest programs: ONNX Runtime through the cost runner (as TVM artifacts
    are), the others through ``lprnet_edge.runtime.peers run``."""
    ensure_peers(aarch64_rootfs())
    progs = {}
    for label, (runtime, model) in models.items():
        if runtime == "onnxruntime":
            name = "onnxruntime-folded" if label == ORT_FOLDED else "onnxruntime"
            progs[label] = local_program(name, ("--onnx", str(model)), cpu)
        else:
            progs[label] = python_program(runtime, (
                "-m", "lprnet_edge.runtime.peers", "run", "--runtime", runtime, "--model",
                str(model), "--runs", "1", "--warmup", "1", "--threads", "1"), cpu)
    return progs


def accuracies(target: str, work: Path, labels: list[str], peers: dict[str, tuple[str, Path]],
               cpu: Any, test_dir: Path, jobs: int) -> dict[str, Any]:
    """test/ accuracy of each TVM variant and each peer under qemu (``arm_accuracy``), kept
    in ``work`` by the artifact's (or the peer model's) identity."""
    from arm_accuracy import artifact_key, peer_accuracy, peer_key, test_accuracy

    store = work / f"arm-{target}-accuracy.json"
    known = json.loads(store.read_text()) if store.is_file() else {}

    def one(label: str) -> tuple[str, dict[str, Any]]:
        if label in peers:
            runtime, model = peers[label]
            key = peer_key(runtime, model, cpu)
        else:
            artifact = artifact_dir(target, label, work)
            key = artifact_key(artifact)  # not the estimate's method: accuracy does not use it
        if key not in known:
            log(f"{label}: reading test/ under qemu -cpu {cpu.qemu_cpu}")
            t0 = time.time()
            known[key] = (peer_accuracy(*peers[label], cpu, test_dir) if label in peers
                          else test_accuracy(artifact, cpu, test_dir))
            log(f"{label}: {known[key]['accuracy']:.3f} on test/ ({time.time() - t0:.0f} s)")
            store.write_text(json.dumps(known))  # a long run keeps what it has read
        return label, known[key]

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = dict(pool.map(one, [k for k in TVM_VARIANTS if k in labels] + list(peers)))
    store.write_text(json.dumps(known))
    return done


def estimate_target(target: str, work: Path, jobs: int, build: bool = True,
                    test_dir: Path | None = None) -> dict[str, Any]:
    """Build (unless ``build`` is false: then only what ``work`` has), estimate, and return
    the rows of one target (kept in ``work``); with ``test_dir``, each TVM variant's
    accuracy on it too."""
    cpu = cpu_model(TARGET_CPU[target])
    work.mkdir(parents=True, exist_ok=True)
    progs, missing = {}, {}
    for label in TVM_VARIANTS:
        if label == TUNED and target not in TUNED_TARGETS:
            continue
        if build or (artifact_dir(target, label, work) / "manifest.json").is_file():
            progs[label] = artifact_program(build_variant(target, label, work), cpu)
        else:
            missing[label] = "not built in this run (--only-built)"
    peers, peers_missing = peer_models(work)
    missing.update(peers_missing)
    progs.update(peer_programs(peers, cpu))

    store = work / f"arm-{target}-rows.json"
    known = json.loads(store.read_text()) if store.is_file() else {}

    def one(label: str) -> tuple[str, dict[str, Any] | str]:
        if row_key(progs[label]) in known:
            return label, known[row_key(progs[label])]
        t0 = time.time()
        try:
            est: CostEstimate = estimate_cycles(progs[label], cpu, kernels=label.startswith("TVM"),
                                                timeout=4 * 3600)
        except Exception as e:  # noqa: BLE001  (a peer crashing under qemu is a row's note)
            log(f"{label}: failed: {e}")
            return label, f"failed: {str(e).splitlines()[0][:200]}"
        log(f"{label}: {est.cycles / 1e6:.1f} M cycles ({time.time() - t0:.0f} s)")
        return label, est.to_dict()

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = dict(pool.map(one, progs))
    known.update({row_key(progs[k]): v for k, v in done.items() if isinstance(v, dict)})
    store.write_text(json.dumps(known))
    rows = {k: v for k, v in done.items() if isinstance(v, dict)}
    missing.update({k: v for k, v in done.items() if isinstance(v, str)})
    command = (f"python benchmarks/run.py --target {target}" + ("" if build else " --only-built")
               + (" --accuracy" if test_dir else ""))
    sizes = {label: artifact_bytes(artifact_dir(target, label, work))
             for label in TVM_VARIANTS if label in rows}
    acc = (accuracies(target, work, list(rows), {k: v for k, v in peers.items() if k in rows},
                      cpu, test_dir, jobs) if test_dir else {})
    from arm_threads import artifact_threads

    from lprnet_edge.compiler.target import load_target

    res = {"target": target, "cpu": cpu.to_dict(), "rows": rows, "missing": missing,
           "artifact_bytes": sizes, "test_accuracy": acc,
           "cores": load_target(target).cores,
           "threads": {label: artifact_threads(artifact_dir(target, label, work))
                       for label in (FP32, INT8) if label in rows},
           "flops_folded": folded_flops(), "kernel_flops": kernel_flops(target),
           "date": time.strftime("%Y-%m-%d"),
           "command": command}
    (work / f"arm-{target}.json").write_text(json.dumps(res, indent=1))
    return res


def artifact_bytes(artifact: Path) -> int:
    """What a board stores of a TVM artifact: the compiled model and its parameters."""
    return sum((artifact / f).stat().st_size for f in ("model.so", "params.npz"))


def _smallest(rows: dict[str, Any], sizes: dict[str, int],
              acc: dict[str, Any]) -> str | None:
    """The goal on the smallest TVM variant within 0.5 point of fp32 on test/ (every variant
    when accuracy was not measured): within 10% of the fastest such variant's speed."""
    cyc = {k: rows[k]["estimated_cycles"] for k in sizes if k in rows}
    if acc and FP32 in acc:
        cyc = {k: c for k, c in cyc.items()
               if k in acc and acc[k]["accuracy"] >= acc[FP32]["accuracy"] - 0.005}
    if not cyc:
        return None
    small, fast = min(cyc, key=lambda k: sizes[k]), min(cyc, key=cyc.get)  # type: ignore[arg-type]
    scope = ("within 0.5 pt of fp32 on test/" if acc and FP32 in acc
             else "test/ accuracy not measured: run with --accuracy")
    return _goal(f"the smallest TVM variant {scope} ({small}, {sizes[small] / 1e3:.0f} kB of "
                 f"model.so + params.npz) vs the fastest such ({fast})",
                 cyc[fast] / cyc[small], 0.9)


def row_key(prog: Program) -> str:
    """A program's identity for reuse: its command and the files it loads (their hashes)."""
    h = hashlib.sha256(f"m{METHOD} {' '.join(prog.argv[1:])}".encode())
    for a in prog.argv:
        p = Path(a)
        f = p / "manifest.json" if p.is_dir() else p
        if f.is_file() and f.suffix in (".json", ".onnx", ".param", ".tflite"):
            h.update(f.read_bytes())
    return h.hexdigest()[:24]


def folded_flops() -> float:
    """FLOPs per plate of the channel-folded model (what the fp32 kernels must compute)."""
    from lprnet_edge.model.channel_fold import fold_all
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.flops import summary
    from lprnet_edge.model.weights import resolve_weights

    folded, _ = fold_all(load_model(resolve_weights(None)))
    s = summary(folded)
    return float(s.get("flops") or s.get("total_flops") or 2 * s["macs"])


def _fmt_row(label: str, r: dict[str, Any], ref: dict[str, Any] | None, clocks: list[float],
             flops: float) -> str:
    ms = [r["cycles"] / (g * 1e6) for g in clocks]
    vs = f"{ref['cycles'] / r['cycles']:.2f}x" if ref else "-"
    per_cycle = flops / r["cycles"]
    return (f"| {label} | {r['instructions'] / 1e6:.1f} | {r['cycles'] / 1e6:.1f} | "
            f"{r['ipc']:.2f} | " + " | ".join(f"{m:.1f}" for m in ms) +
            f" | {vs} | {per_cycle:.2f} |")


def _sizes_and_accuracy(res: dict[str, Any], cpu: dict[str, Any]) -> list[str]:
    """What each TVM variant stores on the board and, when measured, reads of test/."""
    sizes, acc = res.get("artifact_bytes") or {}, res.get("test_accuracy") or {}
    if not sizes:
        return []
    parts = [f"{k}: {sizes[k] / 1e3:.0f} kB"
             + (f", {acc[k]['accuracy']:.3f} ({acc[k]['correct']}/{acc[k]['count']})"
                if k in acc else "") for k in sizes]
    what = ("model.so + params.npz, and exact-plate accuracy on test/ read by the runtime "
            f"under `qemu-aarch64 -cpu {cpu['qemu_cpu']}` at batch 1" if acc
            else "model.so + params.npz")
    lines = ["", f"TVM artifacts ({what}): " + "; ".join(parts) + "."]
    peers = [f"{k}: {v['accuracy']:.3f} ({v['correct']}/{v['count']})"
             for k, v in acc.items() if k not in sizes]
    if peers:
        lines += ["", "Peers on test/ (the same preprocessing and decoding around each "
                  "runtime's model, under the same qemu): " + "; ".join(peers) + "."]
    return lines


def render_target(res: dict[str, Any]) -> list[str]:
    """One target's section: the table, the fastest TVM variant's kernels, the limit."""
    cpu, rows = res["cpu"], res["rows"]
    clocks = cpu["clocks_ghz"]
    flops = res["flops_folded"]
    peak = PEAK_FLOP_PER_CYCLE[cpu["name"]]
    ref = rows.get(REFERENCE, {})
    ref = {"cycles": ref["estimated_cycles"]} if ref else None
    head = " | ".join(f"est. ms @{g:g} GHz" for g in clocks)
    lines = [f"## {res['target']}: one {cpu['name']} core ({cpu['board']}), 1 thread", "",
             f"`{res['command']}` ({res['date']}). Estimated, not measured: qemu "
             f"`-cpu {cpu['qemu_cpu']}` counts, llvm-mca `-mcpu={cpu['mca_cpu']}` weighs."
             + (" LLVM has no Cortex-A76 model: the A76 is weighed with its Neoverse N1 "
                "model, the A76's server sibling (the same two 128-bit FP pipes)."
                if cpu["name"] == "cortex-a76" else ""), "",
             f"| program | M instructions | est. M cycles | IPC | {head} | speed-up vs "
             f"{REFERENCE} | folded FLOP / est. cycle |",
             "|---|---:|---:|---:|" + "---:|" * len(clocks) + "---:|---:|"]
    for label, r in rows.items():
        lines.append(_fmt_row(label, {"cycles": r["estimated_cycles"],
                                      "instructions": r["instructions"], "ipc": r["ipc"]},
                              ref, clocks, flops))
    for label, why in res["missing"].items():
        lines.append(f"| {label} | - | - | - | " + " | ".join("-" for _ in clocks)
                     + f" | - | {why} |")
    lines += _sizes_and_accuracy(res, cpu)
    limit = flops / peak
    lines += ["", f"Physical limit: the folded model's {flops / 1e6:.0f} MFLOP at {peak} FP32 "
              f"FLOP/cycle are {limit / 1e6:.1f} M cycles = "
              + ", ".join(f"{limit / (g * 1e6):.1f} ms at {g:g} GHz" for g in clocks)
              + " on one core. The FLOP/cycle column divides the folded model's FLOPs by each "
              "program's cycles: the same work for every row (a pruned model computes fewer, "
              "ONNX Runtime on the unfolded graph about twice as many FLOPs)."]
    kflops = res.get("kernel_flops") or {}
    lines += _goals(rows, cpu["name"])
    smallest = _smallest(rows, res.get("artifact_bytes") or {}, res.get("test_accuracy") or {})
    if smallest:
        lines.append(smallest)
    if FP32 in rows and NCHW in rows:
        ratio = rows[NCHW]["estimated_cycles"] / rows[FP32]["estimated_cycles"]
        lines.append(f"- layout, chosen on this core: the default NHWC build is {ratio:.2f}x "
                     "as fast as `--layout NCHW`"
                     + ("" if ratio >= 1 else " (**NCHW would be the faster default here**)"))
    share = conv_peak_share(rows, FP32, kflops, peak)
    if share:
        # A bound, not a build: at this share of the peak, what any layout could still gain.
        lines.append(f"- blocked channels (NCHWc) are not built: the NHWC fp32 convolution "
                     f"kernels run at {share[2]:.0%} of the core's {peak} FLOP/cycle, so no "
                     f"layout could make them more than {1 / share[2]:.2f}x faster")
    # The A72's peak is measured; the A76's is its pipes' width, not a measurement.
    if share and cpu["name"] == "cortex-a72":
        lines.append(f"- fp32 convolution kernels at >= 60% of the core's {peak} FLOP/cycle "
                     f"({FP32}): {share[0]} of {share[1]}; all of them together at "
                     f"{share[2]:.0%} of peak")
    lines += _kernels(rows, clocks[0], FP32, kflops, peak)
    lines += _kernels(rows, clocks[0])
    return lines + _cores(res)


def _cores(res: dict[str, Any]) -> list[str]:
    """Which kernels can use the board's cores (``arm_threads``): a bound, not a time."""
    from arm_threads import core_lines

    cores, ghz = res.get("cores", 1), res["cpu"]["clocks_ghz"][0]
    threads = {k: v for k, v in (res.get("threads") or {}).items() if v}
    if cores < 2 or not threads:
        return []
    lines = ["", f"### {res['target']}: what {cores} cores can give (a bound from the estimate)",
             "", "Multi-core time needs the board. From the emulator: each kernel's "
             "one-thread cycles (above) and its parallel loops as built "
             "(`reports.compile.threads` in the manifest); a loop of e iterations on "
             f"{cores} cores takes ceil(e/{cores})/e of its one-thread time at best. Left "
             "out: fork/join, shared caches, memory bandwidth. On a board: `lprnet-edge build "
             f"--target {res['target']} -o lprnet-{res['target']} && lprnet-edge deploy "
             f"lprnet-{res['target']} --host pi@PI && lprnet-edge bench --host pi@PI "
             f"--threads {cores} --profile`, then `--threads 1`."]
    for label, t in threads.items():
        lines += core_lines(label, res["rows"][label], t, cores, ghz)
    return lines


def _goal(text: str, have: float | None, want: float, why: str = "") -> str:
    if have is None:
        return f"- {text}: not measured in this run" + (f" ({why})" if why else "")
    verdict = "met" if have >= want else "missed"
    return f"- {text}: **{have:.2f}x**, goal >= {want:g}x: **{verdict}** ({have / want - 1:+.0%})"


def _goals(rows: dict[str, Any], cpu: str) -> list[str]:
    """The speed goals on this core, each with its margin (estimated cycles, 1 thread)."""
    cyc = {k: v["estimated_cycles"] for k, v in rows.items()}
    peers = {k: c for k, c in cyc.items() if k in PEERS}
    out = ["", "Goals (estimated cycles at 1 thread; ratios are speed-ups):", ""]
    if peers:
        best = min(peers, key=peers.get)  # type: ignore[arg-type]
        vs = f"the fastest fp32 peer ({best})"
        out.append(_goal(f"untuned TVM fp32 vs {vs}",
                         peers[best] / cyc[FP32] if FP32 in cyc else None, 1.2))
        out.append(_goal(f"tuned TVM fp32 vs {vs}",
                         peers[best] / cyc[TUNED] if TUNED in cyc else None, 1.5,
                         "no tuned row for this target"))
    fp32 = min((cyc[k] for k in (FP32, TUNED) if k in cyc), default=None)
    want = 3.0 if cpu == "cortex-a76" else 2.0
    ceiling = INT8_MACS_PER_CYCLE[cpu] / (PEAK_FLOP_PER_CYCLE[cpu] / 2)
    out.append(_goal("TVM int8 vs the fastest TVM fp32",
                     fp32 / cyc[INT8] if fp32 and INT8 in cyc else None, want)
               + f"; the model's ceiling is {ceiling:g}x ({INT8_MACS_PER_CYCLE[cpu]} int8 "
               f"vs {PEAK_FLOP_PER_CYCLE[cpu] // 2} fp32 multiply-accumulates per cycle)")
    return out


def kernel_flops(target: str) -> dict[str, float]:
    """FLOPs per call of each fp32 kernel of the folded model built for ``target`` (TIR's
    own count, by kernel name), and the calls per inference."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    from lprnet_edge.compiler.compile import prepare_for_tuning
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.weights import resolve_weights

    spec = load_target(target)
    mod, _ = to_relax(load_model(resolve_weights(None)))
    with tvm.target.Target(spec.tvm_target()):
        tasks = ms.relax_integration.extract_tasks(prepare_for_tuning(mod, spec),
                                                   spec.tvm_target())
    out = {}
    for t in tasks:
        try:
            out[t.task_name] = float(estimate_tir_flops(t.dispatched[0])) * float(t.weight)
        except Exception:  # noqa: BLE001  (an op TIR cannot count: no FLOP column)
            continue
    return out


def _kernels(rows: dict[str, Any], ghz: float, label: str | None = None,
             flops: dict[str, float] | None = None, peak: float = 0.0,
             n: int = 12) -> list[str]:
    """The kernel table of ``label`` (default: the fastest TVM row); with ``flops``, each
    kernel's FLOPs per estimated cycle and its share of the core's peak."""
    tvm = {k: v for k, v in rows.items() if k.startswith("TVM")}
    if not tvm:
        return []
    label = label if label in tvm else min(tvm, key=lambda k: tvm[k]["estimated_cycles"])
    extra = " FLOP / est. cycle | of peak |" if flops else ""
    out = ["", f"Kernel profile of {label} (estimated):", "",
           f"| kernel | M instructions | est. M cycles | share | est. ms @{ghz:g} GHz |{extra}",
           "|---|---:|---:|---:|---:|" + ("---:|---:|" if flops else "")]
    for k in tvm[label]["kernels"][:n]:
        line = (f"| {k['name']} | {k['instructions'] / 1e6:.2f} | {k['cycles'] / 1e6:.2f} "
                f"| {k['share'] * 100:.1f}% | {k['cycles'] / (ghz * 1e6):.2f} |")
        if flops:
            f = flops.get(k["name"])
            line += (f" {f / k['cycles']:.2f} | {f / k['cycles'] / peak:.0%} |" if f
                     else " - | - |")
        out.append(line)
    return out


def conv_peak_share(rows: dict[str, Any], label: str, flops: dict[str, float],
                    peak: float) -> tuple[int, int, float] | None:
    """Of ``label``'s convolution kernels: how many reach 60% of peak, of how many, and the
    share of peak over all of them together."""
    if label not in rows:
        return None
    convs = [k for k in rows[label]["kernels"] if "conv2d" in k["name"] and k["name"] in flops]
    if not convs:
        return None
    good = sum(flops[k["name"]] / k["cycles"] >= 0.6 * peak for k in convs)
    total = sum(flops[k["name"]] for k in convs) / sum(k["cycles"] for k in convs)
    return good, len(convs), total / peak


def render(results: list[dict[str, Any]]) -> str:
    cmds = " and ".join(f"`{r['command']}`" for r in results)
    lines = ["# LPRNet on a Raspberry Pi's core, estimated (no board)", "",
             f"Generated by {cmds}. Do not edit by hand. Every figure here is an "
             "**estimate** from the cost instrument (`lprnet-edge bench --estimate`), "
             "validated on x86 in docs/arm-estimates.md.", "",
             f"The model behind every estimate: {CAVEATS}.", "",
             "The TVM rows apply the packaged default schedules of the core "
             "(`lprnet_edge/compiler/data/default_schedules/cortex-a72/` and `cortex-a76/`, "
             "tuned against this estimate by `python benchmarks/make_default_schedules.py "
             "--target rpi4|rpi5`; the A76 takes the A72's record for a kernel its own set "
             "lacks), then the x86 set for workloads they lack. The tuned row (rpi4) is "
             "`lprnet-edge build --target rpi4 --tune` with its "
             "default budget (at most 25 min on this machine's cores), tuning against this "
             "estimate from an empty database: what a user without a board gets.", ""]
    for res in results:
        lines += render_target(res) + [""]
    return "\n".join(lines)


def run(target: str, work: Path, out: Path, jobs: int = 3, build: bool = True,
        test_dir: Path | None = None) -> str:
    """``benchmarks/run.py --target rpi4|rpi5``: estimate the target, rewrite the doc."""
    estimate_target(target, work, jobs, build, test_dir)
    results = [json.loads((work / f"arm-{t}.json").read_text()) for t in TARGET_CPU
               if (work / f"arm-{t}.json").is_file()]
    text = render(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
