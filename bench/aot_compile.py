"""Compile every Triton kernel specialization the host launchers choose, for sm_80 and sm_90, with no GPU.

    python bench/aot_compile.py                       # -> bench/results/aot-compile-triton<ver>.json
    python bench/aot_compile.py --presets cifar-r18 --dtypes bf16 --output /tmp/aot.json

1. Capture: the real Mix Block (`automix_fast.mixing.mixblock.MixBlock`) and `ops.mask_mix`
   run forward and backward on `meta` tensors at each preset's shapes, for every dtype,
   memory format, mask mode (and lam_concat where the recipe has it), inside
   `automix_fast.kernels.launches.recording()`: each launcher records what it would launch.
   Nothing is hand-listed, so the list cannot drift from the launchers.
2. Specialize: each recorded launch goes through triton's own binder (the code the JIT runs
   at launch) to get the signature, constexprs and divisibility attributes; identical
   specializations are compiled once.
3. Compile for each target with `triton.compile(ASTSource(...), target=GPUTarget(...))`
   (TTGIR -> PTX -> cubin with the ptxas bundled in the wheel) in a pool of worker processes,
   with a throw-away cache directory; then `ptxas -v` on the PTX for registers, spills and
   shared memory, and the PTX itself for wgmma / mma.sync and the width of every global load
   and store, per source line of the kernel (from the PTX's `.loc` line info).

Must run without TRITON_INTERPRET (the interpreter replaces the JIT functions); the test
(tests/test_bench_aot_compile.py) runs it in a subprocess.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, git_commit  # noqa: E402

# name: (batch N, feature channels C of the Mix Block input (D = C // 2), feature side h,
#        image side S, lam_concat settings the recipes use)
PRESETS = {
    "cifar-r18": (100, 256, 8, 32, (False,)),
    "tiny-r18": (100, 256, 16, 64, (False,)),
    "imagenet-r50": (256, 1024, 14, 224, (True, False)),
    "l784-d1024": (64, 2048, 28, 224, (True,)),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
MODES = ("nearest", "bilinear")
TARGETS = {"sm_80": 80, "sm_90": 90}


# ----------------------------------------------------------------------------- 1. capture

def capture(presets=tuple(PRESETS), dtypes=tuple(DTYPES), layouts=tuple(LAYOUTS), modes=MODES):
    """[(context dict, Launch)] for one training-step use of the Mix Block per combination."""
    from automix_fast.mixing.mixblock import MixBlock
    from automix_fast.kernels import launches

    meta = torch.device("meta")
    out = []
    for preset in presets:
        n, c, h, size, lam_concats = PRESETS[preset]
        for dname in dtypes:
            dtype = DTYPES[dname]
            for layout in layouts:
                fmt = LAYOUTS[layout]
                for mode in modes:
                    for lam_concat in lam_concats:
                        with torch.device(meta):
                            block = MixBlock(c, lam_concat=lam_concat, mode=mode, backend="triton").to(dtype)
                        f = torch.empty(n, c, h, h, dtype=dtype, device=meta).contiguous(memory_format=fmt)
                        x = torch.empty(n, 3, size, size, dtype=dtype, device=meta).contiguous(memory_format=fmt)
                        perm = torch.empty(n, dtype=torch.int64, device=meta)
                        with launches.recording() as recorded:
                            logits = block(f, 0.3, perm)
                            x_mix, s_mean = block.mix(logits, x, perm)
                            n_fwd = len(recorded)
                            # square(): the gradient reaching the kernel is then a dense tensor in
                            # x's dtype and memory format, as the k encoder's input gradient is in
                            # training (a plain sum would hand it a stride-0 expanded one).
                            (x_mix.float().square().sum() + s_mean.sum()).backward()
                        ctx = dict(preset=preset, dtype=dname, layout=layout, mode=mode, lam_concat=lam_concat)
                        for i, rec in enumerate(recorded):
                            out.append((dict(ctx, pass_="fwd" if i < n_fwd else "bwd"), rec))
    return out


# ----------------------------------------------------------------------------- 2. specialize

def specialize(rec, backend):
    """(signature, constexprs, attrs, options dict) exactly as the JIT would build them at launch."""
    from triton.runtime.jit import create_function_from_signature

    fn = rec.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(rec.kwargs, debug=False)
    bound_args, specialization, options = binder(*rec.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, {"num_warps": options.num_warps, "num_stages": options.num_stages}


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def spec_key(rec, signature, constexprs, attrs, opts) -> str:
    parts = [f"{rec.module}.{rec.name}", json.dumps(signature, sort_keys=True),
             repr(sorted((k, _jsonable(v)) for k, v in constexprs.items())), repr(sorted(attrs.items())),
             json.dumps(opts, sort_keys=True)]
    return "|".join(parts)


# ----------------------------------------------------------------------------- 3. compile

def _ptxas(cc: int) -> str:
    """The bundled ptxas triton itself uses for this target (a newer one for sm_90 and up)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


def _ptxas_version(cc: int) -> str:
    out = subprocess.run([_ptxas(cc), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")


def access_widths(ptx: str, source: str) -> dict:
    """{source line: {"ld"/"st": sorted byte widths}} of global loads/stores, via `.loc` line info.

    Only lines of `source` (the kernel's file) are kept: the PTX names each file with `.file`.
    """
    files = {m.group(1): m.group(2) for m in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)}
    line = None
    out: dict = defaultdict(lambda: defaultdict(set))
    for text in ptx.splitlines():
        loc = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", text)
        if loc:
            line = int(loc.group(2)) if files.get(loc.group(1), "").endswith(source) else None
            continue
        m = _ACCESS.search(text)
        if not m or line is None:
            continue
        quals = m.group(2).split(".")
        vec = next((int(q[1:]) for q in quals if re.fullmatch(r"v\d", q)), 1)
        bits = next((int(q[1:]) for q in quals if re.fullmatch(r"[bfsu]\d+", q)), 0)
        out[line][m.group(1)].add(vec * bits // 8)
    return {ln: {op: sorted(w) for op, w in ops.items()} for ln, ops in sorted(out.items())}


def _ptxas_info(ptx: str, cc: int, tmp: str) -> dict:
    """Registers, spills, stack and static smem from `ptxas -v`, with the flags triton compiles with."""
    path = os.path.join(tmp, "k.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    res = subprocess.run([_ptxas(cc), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path,
                          "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode:
        raise RuntimeError(f"ptxas failed: {log.strip()[-1000:]}")
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "smem_static": num(r"(\d+) bytes smem")}


def compile_one(job: dict) -> dict:
    """Worker: compile one specialization for one target; never raises (errors are results)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(job["module"]), job["kernel"])
        cc = job["cc"]
        src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=job["options"])
        ptx = compiled.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            info = _ptxas_info(ptx, cc, tmp)
        info.update(
            ok=True,
            smem=int(compiled.metadata.shared),
            wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
            mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
            access=access_widths(ptx, os.path.basename(fn.fn.__code__.co_filename)),
        )
    except Exception as e:  # a compile error is a finding, reported per specialization
        info = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:2000]}"}
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.pop("TRITON_INTERPRET", None)


def run(presets=tuple(PRESETS), dtypes=tuple(DTYPES), layouts=tuple(LAYOUTS), modes=MODES,
        targets=tuple(TARGETS), workers: int = 2) -> dict:
    from automix_fast.kernels.common import triton_interpret

    if triton_interpret():
        raise SystemExit("error: unset TRITON_INTERPRET to compile kernels ahead of time")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    t0 = time.perf_counter()
    backend = make_backend(GPUTarget("cuda", 90, 32))
    captured = capture(presets, dtypes, layouts, modes)
    specs: dict[str, dict] = {}
    uses = []
    for ctx, rec in captured:
        signature, constexprs, attrs, opts = specialize(rec, backend)
        key = spec_key(rec, signature, constexprs, attrs, opts)
        if key not in specs:
            names = {path: rec.kernel.arg_names[path[0]] for path in constexprs}
            specs[key] = dict(id=len(specs), module=rec.module, kernel=rec.name, signature=signature,
                              constexprs=constexprs, attrs=attrs, options=opts, names=names)
        uses.append(dict(ctx, kernel=rec.name, grid=[int(g) for g in rec.grid], blocks=rec.blocks, spec=specs[key]["id"]))
    t_capture = time.perf_counter() - t0

    jobs = [dict(spec, cc=TARGETS[t], target=t) for spec in specs.values() for t in targets]
    for job in jobs:
        del job["names"]
    with tempfile.TemporaryDirectory(prefix="aot-triton-cache-") as cache:
        ctx_mp = __import__("multiprocessing").get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx_mp, initializer=_worker_init,
                                    initargs=(cache,)) as pool:
            results = list(pool.map(compile_one, jobs))
    kernels = []
    for spec in specs.values():
        kernels.append(dict(id=spec["id"], module=spec["module"], kernel=spec["kernel"],
                            signature=spec["signature"],
                            constexprs={spec["names"][k]: _jsonable(v) for k, v in spec["constexprs"].items()},
                            options=spec["options"]))
    for job, res in zip(jobs, results):
        kernels[job["id"]][job["target"]] = res
    return {
        "meta": {
            "what": "ahead-of-time compile of every captured kernel specialization (bench/aot_compile.py)",
            "triton": triton.__version__, "torch": torch.__version__, "ptxas": {t: _ptxas_version(TARGETS[t]) for t in targets},
            "git_commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "targets": {t: ("sm_90a" if TARGETS[t] == 90 else t) for t in targets},
            "presets": {p: dict(zip(("N", "C", "h", "image", "lam_concat"), PRESETS[p])) for p in presets},
            "dtypes": list(dtypes), "layouts": list(layouts), "modes": list(modes),
            "launches_captured": len(uses), "unique_specializations": len(specs),
            "seconds_capture": round(t_capture, 1), "seconds_total": round(time.perf_counter() - t0, 1),
            "access_note": "access: {source line: {ld|st: byte widths of the global accesses}}; "
                           "16 = one 16-byte vector access per thread",
        },
        "launches": uses,
        "kernels": kernels,
    }


# ----------------------------------------------------------------------------- 4. budgets

LOW_PRECISION = ("fp16", "bf16")
# Per mask_mix kernel: the source lines that touch the images, from the first load of x to the
# last line holding the second marker (the PTX line info of a vector access may name any line of
# that range: LLVM may attach a load to a line of the arithmetic after it; no other load sits
# there), and which of those accesses must be 16-byte vectors.
IMAGE_ACCESS = {
    "_fwd": ("tl.load(x_base", "tl.store(o_base", ("ld", "st")),
    "_bwd_rows": ("a = tl.load(x_base", "tl.store(T + n * stn", ("ld",)),
    "_bwd_nearest": ("x_own = tl.load(x_base", "bx = _nearest_src(px", ("ld",)),
}


def image_access_lines(kernel: str = "_fwd") -> range:
    import inspect

    from automix_fast.kernels import mask_mix

    first_marker, last_marker, _ = IMAGE_ACCESS[kernel]
    lines, start = inspect.getsourcelines(getattr(mask_mix, kernel).fn)
    first = next(i for i, t in enumerate(lines) if first_marker in t)
    last = max(i for i, t in enumerate(lines) if last_marker in t)
    return range(start + first, start + last + 1)


def budget_violations(report: dict) -> list[str]:
    """What the report breaks: compile errors; spills in kernels launched for fp16/bf16;
    image loads/stores of the mask_mix forward, and image/gradient loads of its backward kernels
    (nearest, and bilinear's rows kernel), that are not 16-byte vector accesses (either layout)."""
    out = []
    targets = list(report["meta"]["targets"])
    kernels = report["kernels"]
    for k in kernels:
        for t in targets:
            if not k[t]["ok"]:
                out.append(f"compile error: {k['kernel']} #{k['id']} on {t}: {k[t]['error'][:300]}")
    lowp = {u["spec"] for u in report["launches"] if u["dtype"] in LOW_PRECISION}
    for k in kernels:
        for t in targets:
            r = k[t]
            if k["id"] in lowp and r["ok"] and (r["spill_stores"] or r["spill_loads"]):
                out.append(f"spill: {k['kernel']} #{k['id']} on {t}: {r['spill_stores']} B stores, "
                           f"{r['spill_loads']} B loads ({k['constexprs']})")
    for kernel, (_, _, ops_needed) in IMAGE_ACCESS.items():
        lines = image_access_lines(kernel)
        uses = {u["spec"]: u for u in report["launches"]
                if u["kernel"] == kernel and "mask_mix" in kernels[u["spec"]]["module"]}
        for sid, use in sorted(uses.items()):
            for t in targets:
                r = kernels[sid][t]
                if not r["ok"]:
                    continue
                widths = {op: set() for op in ("ld", "st")}
                for line, ops in r["access"].items():
                    if int(line) in lines:
                        for op, ws in ops.items():
                            widths[op].update(ws)
                found = set().union(*(widths[op] for op in ops_needed))
                if any(not widths[op] for op in ops_needed) or found != {16}:
                    out.append(f"mask_mix {kernel} #{sid} ({use['layout']}, {use['dtype']}) on {t}: image accesses are "
                               f"not all 16-byte vectors: loads {sorted(widths['ld'])} B, stores {sorted(widths['st'])} B")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/aot-compile-triton<ver>.json)")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default today; silences its warning
    report = run(args.presets, args.dtypes, args.layouts, args.modes, args.targets, args.workers)
    path = args.output or RESULTS / f"aot-compile-triton{report['meta']['triton']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    print(f"wrote {path}")
    violations = budget_violations(report)
    for v in violations:
        print("budget:", v)
    return 1 if violations else 0


def summary(report: dict) -> str:
    rows = [f"{'id':>3} {'kernel':<10} {'target':<6} {'regs':>4} {'spill':>5} {'smem':>6} {'wgmma':>5} {'mma':>4}  constexprs"]
    for k in report["kernels"]:
        for t in report["meta"]["targets"]:
            r = k[t]
            if not r["ok"]:
                rows.append(f"{k['id']:>3} {k['kernel']:<10} {t:<6} ERROR {r['error'][:120]}")
                continue
            ce = ",".join(f"{n}={v}" for n, v in k["constexprs"].items() if n.isupper())
            rows.append(f"{k['id']:>3} {k['kernel']:<10} {t:<6} {r['registers']:>4} {r['spill_stores']:>5} "
                        f"{r['smem']:>6} {r['wgmma']:>5} {r['mma_sync']:>4}  {ce[:90]}")
    m = report["meta"]
    rows.append(f"{m['launches_captured']} launches, {m['unique_specializations']} specializations, "
                f"capture {m['seconds_capture']} s, total {m['seconds_total']} s")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
