"""Per-launch counters of emulated kernels: device-memory traffic, threadgroups, threads, barriers.

    with msim.counters.record() as launches:      # every launch inside counts its device-memory traffic
        ...                                       # run kernels (msim.metal_kernel ones)
    print(msim.counters.report(launches))         # one row per launch
    msim.counters.traffic_ratio(launches, minimum_bytes)   # bytes read / the bytes the work needs at least

Bytes are counted per load and store the compiled kernel code executes (see `count_traffic` in the README):
a value read twice counts twice, as device memory would serve it twice without a cache. The emulator has no
caches, so these are the traffic a kernel asks of memory, an upper bound of what DRAM serves on a GPU.
`bytes_read` counts the `device` buffers; buffers MLX puts in the `constant` address space (inputs of fewer
than 8 elements, shape/stride arrays), read by every thread through the constant cache, are reported apart.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

_recorders: list[list["Launch"]] = []


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]  # as dispatched: min(requested, grid) per dimension
    threadgroups: int
    barriers: int  # threadgroup barriers resolved, summed over threadgroups
    bytes_read: int  # device buffers
    bytes_written: int
    constant_bytes_read: int
    buffers: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # name -> (read, written, space)
    loads_by_width: dict[str, int] = field(default_factory=dict)  # "1", "2", "4", "8", "16", "other"
    inputs: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)  # name -> (shape, strides in elements)

    @property
    def threads_per_threadgroup(self) -> int:
        x, y, z = self.threadgroup
        return x * y * z

    @classmethod
    def from_stats(cls, name: str, stats: dict) -> "Launch":
        return cls(kernel=name, grid=stats["grid"], threadgroup=stats["threadgroup"],
                   threadgroups=stats["n_threadgroups"], barriers=stats["n_barriers"],
                   bytes_read=stats["bytes_read"], bytes_written=stats["bytes_written"],
                   constant_bytes_read=stats["constant_bytes_read"], buffers=dict(stats["buffers"]),
                   loads_by_width=dict(stats["loads_by_width"]), inputs=dict(stats["inputs"]))


def recording() -> bool:
    return bool(_recorders)


def add(launch: Launch) -> None:
    for launches in _recorders:
        launches.append(launch)


@contextlib.contextmanager
def record():
    """Collect a `Launch` for every emulated launch in the block (they compile with traffic counting)."""
    launches: list[Launch] = []
    _recorders.append(launches)
    try:
        yield launches
    finally:
        _recorders.remove(launches)


def bytes_read(launches) -> int:
    return sum(launch.bytes_read for launch in launches)


def traffic_ratio(launches, minimum_bytes: int) -> float:
    """Device bytes the launches read over `minimum_bytes`, the bytes the work needs at least (every needed
    weight, scale, key or value byte once)."""
    if minimum_bytes <= 0:
        raise ValueError(f"minimum_bytes must be positive, got {minimum_bytes}")
    return bytes_read(launches) / minimum_bytes


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def report(launches, minimum_bytes: int | None = None) -> str:
    """A markdown table, one row per launch (and a total row with the traffic ratio when `minimum_bytes` is
    given)."""
    rows = ["| kernel | grid | threadgroup | threadgroups | barriers | read MiB | written MiB | constant KiB | "
            "16-byte loads |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for launch in launches:
        loads = sum(launch.loads_by_width.values())
        wide = f"{launch.loads_by_width.get('16', 0) / loads:.0%}" if loads else "-"
        rows.append(f"| {launch.kernel} | {launch.grid} | {launch.threadgroup} | {launch.threadgroups} | "
                    f"{launch.barriers} | {_mib(launch.bytes_read)} | {_mib(launch.bytes_written)} | "
                    f"{launch.constant_bytes_read / 1024:.1f} | {wide} |")
    if minimum_bytes:
        rows.append(f"| total (minimum {_mib(minimum_bytes)} MiB read: ratio "
                    f"{traffic_ratio(launches, minimum_bytes):.3f}) | | | "
                    f"{sum(la.threadgroups for la in launches)} | {sum(la.barriers for la in launches)} | "
                    f"{_mib(bytes_read(launches))} | {_mib(sum(la.bytes_written for la in launches))} | | |")
    return "\n".join(rows)
