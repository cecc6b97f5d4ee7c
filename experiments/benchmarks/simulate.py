"""Benchmark of `xeno_jax.simulate`: full-size (480 x 640 x 100) cubes per second.

Measured after compilation, blocking on the results, without any disk writes:

1. cubes per second of `simulate.generate` (one image per call) for four species and perfusion
   states, and of `simulate.generate_batch` (``--batch`` images per call, the same specs mixed),
   and the fraction reached of the issue's target (2 cubes/s on the 2-core CPU machine);
2. where the time of one `generate` call goes: jitted sub-stages timed in the same loop as the
   full call (scene layout, and `generate` without sensor noise), as fractions of the full call;
3. ``profile``: the XLA operations (fusions) that take the most time in `generate`,
   from a `jax.profiler` trace, with the JAX operations each one contains;

All repetitions are interleaved (A B C A B C ...), so every ratio shares the machine's noise;
absolute times are those of this CPU under its current load (printed with the load average).

    python experiments/benchmarks/simulate.py                          # parts 1, 2: ~2 minutes
    python experiments/benchmarks/simulate.py --parts=profile            # 3: ~1 minute
    python experiments/benchmarks/simulate.py --parts=all --repeats=3
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np

from xeno_jax import simulate
from xeno_jax.simulate import camera as camera_lib
from xeno_jax.simulate import scene

generate_module = importlib.import_module("xeno_jax.simulate.generate")  # not the function

HEIGHT, WIDTH = 480, 640
TARGET_CUBES_PER_SECOND = 2.0
SPECS = {  # name -> make_spec arguments
    "pig physiological": dict(species="pig", subject=0, focus="kidney"),
    "human malperfusion": dict(species="human", subject=1, state="malperfusion", severity=0.7,
                               focus="kidney"),
    "rat icg": dict(species="rat", subject=2, state="icg", minutes=5.0, focus="liver"),
    "pig venous congestion": dict(species="pig", subject=3, state="venous_congestion",
                                  severity=0.5, focus="kidney"),
}


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min), {os.cpu_count()} CPUs"


def ratio_text(ratios) -> str:
    """Median of per-repetition ratios, with their range."""
    return f"{np.median(ratios):.2f} [{np.min(ratios):.2f}, {np.max(ratios):.2f}]"


def interleaved(fns: dict[str, Callable[[int], object]], repeats: int) -> dict[str, np.ndarray]:
    """Seconds per call of each function, repetitions interleaved; fns take the repetition."""
    times = {name: [] for name in fns}
    for rep in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(rep))
            times[name].append(time.perf_counter() - start)
    return {name: np.array(t) for name, t in times.items()}


def warm_up(fns: dict[str, Callable[[int], object]]) -> None:
    for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(-1))
        print(f"  compiled and ran {name!r} once in {time.perf_counter() - start:.1f} s")


def key(rep: int) -> jax.Array:
    return jax.random.key(1000 + rep)


# -- 1. throughput ----------------------------------------------------------------------------

def throughput(repeats: int, batch: int) -> float:
    specs = {name: simulate.make_spec(**kwargs) for name, kwargs in SPECS.items()}
    single = functools.partial(simulate.generate, height=HEIGHT, width=WIDTH)
    batched = functools.partial(simulate.generate_batch, height=HEIGHT, width=WIDTH)
    mixed = simulate.stack_specs([list(specs.values())[i % len(specs)] for i in range(batch)])
    fns = {name: (lambda rep, s=spec: single(key(rep), s)) for name, spec in specs.items()}
    fns[f"batch of {batch}"] = lambda rep: batched(jax.random.split(key(rep), batch), mixed)
    print("\n1. Throughput (compilation excluded)")
    warm_up(fns)
    times = interleaved(fns, repeats)
    print(f"  {'call':28s} {'median s/call':>14s} {'cubes/s [CPU]':>14s}")
    for name, t in times.items():
        cubes = batch if name.startswith("batch") else 1
        print(f"  {name:28s} {np.median(t):14.3f} {cubes / np.median(t):14.2f}")
    per_call = np.stack([times[name] for name in specs])  # (specs, repeats)
    single_rate = len(specs) / np.median(per_call.sum(0))
    batch_rate = batch / np.median(times[f"batch of {batch}"])
    ratio = times[f"batch of {batch}"] / per_call.mean(0) / batch
    print(f"  single-image calls, all specs: {single_rate:.2f} cubes/s [CPU absolute]")
    print(f"  batch calls:                   {batch_rate:.2f} cubes/s [CPU absolute]")
    print(f"  time per cube, batch / single (same repetitions; median [min, max]): "
          f"{ratio_text(ratio)}")
    best = max(single_rate, batch_rate)
    print(f"  fraction of the target {TARGET_CUBES_PER_SECOND:g} cubes/s reached: "
          f"{best / TARGET_CUBES_PER_SECOND:.2f} [CPU absolute; depends on the load]")
    return best


# -- 2. breakdown -----------------------------------------------------------------------------

def breakdown(repeats: int) -> None:
    spec = simulate.make_spec(**SPECS["pig physiological"])
    generate = functools.partial(simulate.generate, height=HEIGHT, width=WIDTH)
    noiseless = functools.partial(simulate.generate, height=HEIGHT, width=WIDTH,
                                  camera=camera_lib.Camera(noise=False))
    layout = jax.jit(scene.layout, static_argnames=("height", "width"))
    fns = {
        "generate (full)": lambda rep: generate(key(rep), spec),
        "generate, sensor noise off": lambda rep: noiseless(key(rep), spec),
        "scene.layout": lambda rep: layout(key(rep), spec.species, spec.focus, height=HEIGHT,
                                           width=WIDTH),
    }
    print("\n2. Where the time of one generate call goes (pig, physiological)")
    warm_up(fns)
    times = interleaved(fns, repeats)
    full = times["generate (full)"]
    share = {name: np.median(t / full) for name, t in times.items()}
    print(f"  {'stage (own jit)':32s} {'median ms [CPU]':>16s} {'x full call':>12s}")
    for name, t in times.items():
        print(f"  {name:32s} {1e3 * np.median(t):16.1f} {share[name]:12.2f}")
    noiseless_share, layout_share = share["generate, sensor noise off"], share["scene.layout"]
    print(f"  sensor model (1 - noise off / full): {1 - noiseless_share:.2f} of a call; scene "
          f"layout: {layout_share:.2f}; the rest (physiology, optics, illumination): "
          f"{noiseless_share - layout_share:.2f}")


# -- 3. profile -------------------------------------------------------------------------------

def profile(top: int) -> None:
    spec = simulate.make_spec(**SPECS["pig physiological"])
    compiled = simulate.generate.lower(key(0), spec, height=HEIGHT, width=WIDTH).compile()
    hlo = compiled.as_text()
    jax.block_until_ready(compiled(key(0), spec))
    calls = 3
    trace_dir = tempfile.mkdtemp(prefix="bench_simulate_trace_")
    try:
        jax.profiler.start_trace(trace_dir)
        for rep in range(calls):
            jax.block_until_ready(compiled(key(rep), spec))
        jax.profiler.stop_trace()
        path = next(os.path.join(d, f) for d, _, files in os.walk(trace_dir)
                    for f in files if f.endswith(".xplane.pb"))
        data = jax.profiler.ProfileData.from_file(path)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    instructions = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+)", hlo, re.M))
    busy = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in instructions:
                    busy[event.name] += event.duration_ns
    total = sum(busy.values())
    where = _source_locations(hlo)
    by_call = collections.Counter()
    for name, ns in busy.items():
        by_call[where(name)[0]] += ns
    print(f"\n3. Profile of generate: time of each XLA operation (summed over {calls} calls; "
          f"operations overlap on the {os.cpu_count()} cores, so shares are of the summed time)")
    print("  by the call in generate.py that the operation's root comes from:")
    for call, ns in by_call.most_common(top):
        print(f"  {ns / total:6.1%} {ns / calls / 1e6:8.1f} ms  {call}")
    print("  top operations: share, ms/call, name, output, source of its root, JAX ops inside")
    for name, ns in busy.most_common(top):
        call, chain = where(name)
        print(f"  {ns / total:6.1%} {ns / calls / 1e6:8.1f}  {name} {instructions[name]}  "
              f"[{chain}]  {_jax_ops(hlo, name)}")


def _source_locations(hlo: str) -> Callable[[str], tuple[str, str]]:
    """instruction -> (the call in `generate` it comes from, its innermost source frames).

    Reads the stack-frame tables that ``Compiled.as_text()`` prints (FileNames, FunctionNames,
    FileLocations, StackFrames; a parent_frame_id p names frame p - 1, 0 and 1 none).
    """
    def section(title):
        match = re.search(rf"^{title}\n(.*?)\n\n", hlo, re.M | re.S)
        return [line.split(" ", 1) for line in match.group(1).splitlines()] if match else []

    files = {int(i): os.path.basename(v.strip('"')) for i, v in section("FileNames")}
    functions = {int(i): v.strip('"') for i, v in section("FunctionNames")}
    locations, frames = {}, {}
    for i, v in section("FileLocations"):
        f = dict(re.findall(r"(\w+)=(\d+)", v))
        locations[int(i)] = (files[int(f["file_name_id"])], functions[int(f["function_name_id"])],
                             int(f["line"]))
    for i, v in section("StackFrames"):
        f = dict(re.findall(r"(\w+)=(\d+)", v))
        frames[int(i)] = (int(f["file_location_id"]), int(f["parent_frame_id"]) - 1)

    def where(instruction: str) -> tuple[str, str]:
        line = re.search(rf"^\s*(?:ROOT )?%{re.escape(instruction)} = .*$", hlo, re.M).group(0)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        chain = []
        frame_id = int(frame.group(1)) if frame else 0
        while frame_id in frames and len(chain) < 20:
            location, frame_id = frames[frame_id]
            chain.append(locations[location])
        inner = [c for c in chain if c[1] != "<module>"]
        if not any(c[1] == "generate" for c in inner):
            return "(no source location)", ""
        depth = next(i for i, c in enumerate(inner) if c[1] == "generate")
        call = f"generate.py:{inner[depth][2]}" + (f" {inner[depth - 1][1]}" if depth else "")
        return call, " < ".join(f"{c[1]}:{c[2]}" for c in inner[:depth + 1])

    return where


def _jax_ops(hlo: str, instruction: str) -> str:
    """The most frequent JAX op names inside a fusion (from the HLO metadata)."""
    line = re.search(rf"^\s*(?:ROOT )?%{re.escape(instruction)} = .*$", hlo, re.M).group(0)
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = line
    if called:
        match = re.search(rf"^%{re.escape(called.group(1))} .*?^}}", hlo, re.M | re.S)
        body = match.group(0) if match else line
    names = [n.split("jit(generate)/")[-1] for n in re.findall(r'op_name="([^"]*)"', body)]
    counts = collections.Counter(n for n in names if n and n != "jit(generate)")
    return ", ".join(f"{n} x{c}" for n, c in counts.most_common(3))


PARTS = ("throughput", "breakdown", "profile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--batch", type=int, default=4, help="images per generate_batch call")
    parser.add_argument("--parts", default="throughput,breakdown",
                        help=f"comma-separated parts to run, of {','.join(PARTS)}, or 'all'")
    parser.add_argument("--top", type=int, default=12, help="lines listed by the profile")
    args = parser.parse_args()
    parts = PARTS if args.parts == "all" else args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; known: {PARTS}")
    print(f"simulate benchmark: {HEIGHT} x {WIDTH} x 100 cubes, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; {load_average()}")
    if "throughput" in parts:
        throughput(args.repeats, args.batch)
    if "breakdown" in parts:
        breakdown(args.repeats)
    if "profile" in parts:
        profile(args.top)
    print(f"\ndone; {load_average()}")


if __name__ == "__main__":
    main()
