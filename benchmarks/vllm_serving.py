"""Serving through vLLM: its OpenAI-compatible server on the real model, compiled by vLLM's default
backend and by zen, under a bounded load.

    python benchmarks/vllm_serving.py [--formats bf16,int8dq,int4wo] [--systems default,zen]
                                      [--concurrency 1,4,16] [--new 64] [--out benchmarks/results]

Run in the venv ``scripts/vllm-venv`` makes. For each format and system the script starts the server
on 127.0.0.1 (a free port), waits for it to answer, and sends it, with vLLM's own load generator
(``vllm.benchmarks.serve``, random prompts of 128-512 tokens, ``--new`` tokens each, EOS ignored),
4 x c requests (at least 8) at each concurrency c, after two warm-up requests; then it stops the
server. Startup time (process start to first health answer, compile included) and the server's
peak RSS (process tree, sampled) are reported with the load's output tokens/s, TTFT p50/p99 and
TPOT p50. Writes ``vllm-serving.{md,json,png}`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from zen_inductor.cpu import describe as describe_cpu  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """vLLM's OpenAI-compatible server in a process group of its own, on loopback."""

    def __init__(self, fmt: str, system: str, log_path: str):
        from zen_inductor.serving import serve_flags

        self.port = free_port()
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                   "--port", str(self.port), *serve_flags(fmt, system)]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        self.log = open(log_path, "w")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.peak_rss_mb = 0.0
        self._sampling = True
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def _sample_rss(self) -> None:
        import psutil

        root = psutil.Process(self.process.pid)
        while self._sampling:
            try:
                tree = [root, *root.children(recursive=True)]
                self.peak_rss_mb = max(self.peak_rss_mb, sum(p.memory_info().rss for p in tree) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.5)

    def wait_ready(self, timeout: float = 1200) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                time.sleep(2)
        raise TimeoutError(f"the server did not answer in {timeout} s: see {self.log.name}")

    def stop(self) -> None:
        self._sampling = False
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def load(port: int, model: str, concurrency: int, new: int, result_dir: str) -> dict:
    """vLLM's load generator against the server: 4 x concurrency requests (at least 8)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    requests = max(8, 4 * concurrency)
    args = parser.parse_args([
        "--backend", "vllm", "--host", "127.0.0.1", "--port", str(port), "--model", model,
        "--dataset-name", "random", "--random-input-len", "320", "--random-range-ratio", "0.6",
        "--random-output-len", str(new), "--ignore-eos", "--num-prompts", str(requests),
        "--max-concurrency", str(concurrency), "--num-warmups", "2", "--seed", "0", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", result_dir, "--result-filename", f"load-c{concurrency}.json",
    ])
    return main(args)


def run(fmt: str, system: str, concurrencies: list[int], new: int, out: str) -> list[dict]:
    from zen_inductor.serving import model_folder

    logs = os.path.join(out, "vllm-serving-logs", f"{fmt}-{system}")
    os.makedirs(logs, exist_ok=True)
    server = Server(fmt, system, os.path.join(logs, "server.log"))
    rows = []
    try:
        startup = server.wait_ready()
        print(f"{fmt} {system}: server up in {startup:.0f} s", flush=True)
        for c in concurrencies:
            r = load(server.port, model_folder(), c, new, logs)
            rows.append({
                "format": fmt, "system": system, "concurrency": c, "requests": r["completed"] + r.get("failed", 0),
                "completed": r["completed"], "failed": r.get("failed", 0),
                "output_tok_s": r["output_throughput"], "ttft_p50_ms": r["median_ttft_ms"],
                "ttft_p99_ms": r["p99_ttft_ms"], "tpot_p50_ms": r["median_tpot_ms"], "startup_s": startup,
            })
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    for row in rows:
        row["server_peak_rss_mb"] = server.peak_rss_mb
    return rows


def write(rows: list[dict], meta: dict, out: str) -> None:
    with open(os.path.join(out, "vllm-serving.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    lines = [
        "# Serving through vLLM: zen against vLLM's default backend",
        "",
        f"Machine: {meta['cpu']}; vLLM {meta['vllm']} (CPU build) runs the model on {meta['model_threads']} of "
        f"{meta['cores']} cores (it keeps one for its engine). {meta['date']}. Model: SmolLM2-135M-Instruct "
        "(bf16 from the demo's GGUF file; int8dq and int4wo: vLLM quantizes it with torchao at load). "
        f"Load: vLLM's generator, random prompts of 128-512 tokens, {meta['new']} new tokens each, 4 x c requests "
        "(at least 8) at concurrency c after 2 warm-ups. `zen/default`: ratio in the same run "
        "(throughput: higher is better; TTFT, TPOT: lower is better).",
        "",
        "| format | c | system | requests (failed) | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
        "startup s | server peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['format']} | {r['concurrency']} | {r['system']} | {r['requests']} ({r['failed']}) | "
                     f"{r['output_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} | "
                     f"{r['startup_s']:.0f} | {r['server_peak_rss_mb']:.0f} |")
    lines += ["", "| format | c | throughput zen/default | TTFT p50 zen/default | TPOT p50 zen/default |", "|---|---|---|---|---|"]
    for r in rows:
        if r["system"] != "zen":
            continue
        d = next((d for d in rows if d["system"] == "default" and d["format"] == r["format"]
                  and d["concurrency"] == r["concurrency"]), None)
        if d:
            lines.append(f"| {r['format']} | {r['concurrency']} | {r['output_tok_s'] / d['output_tok_s']:.2f}x | "
                         f"{r['ttft_p50_ms'] / d['ttft_p50_ms']:.2f}x | {r['tpot_p50_ms'] / d['tpot_p50_ms']:.2f}x |")
    with open(os.path.join(out, "vllm-serving.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    chart(rows, meta, os.path.join(out, "vllm-serving.png"))


def chart(rows: list[dict], meta: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["format"], r["concurrency"]) for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / len(systems)
    for ax, metric, title in ((axes[0], "output_tok_s", "output tokens/s (higher is better)"),
                              (axes[1], "ttft_p50_ms", "TTFT p50, ms"), (axes[2], "tpot_p50_ms", "TPOT p50, ms")):
        for i, system in enumerate(systems):
            xs, ys = [], []
            for j, case in enumerate(cases):
                r = next((r for r in rows if (r["format"], r["concurrency"]) == case and r["system"] == system), None)
                if r:
                    xs.append(j + (i - (len(systems) - 1) / 2) * width)
                    ys.append(r[metric])
            ax.bar(xs, ys, width, label=system, color="C3" if system == "zen" else None)
        ax.set_xticks(range(len(cases)), [f"{f}\nc={c}" for f, c in cases], fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"vLLM {meta['vllm']} serving SmolLM2-135M: default backend vs zen — {meta['cpu']}, "
                 f"{meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--formats", default="bf16,int8dq,int4wo")
    p.add_argument("--systems", default="default,zen")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    import vllm

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for fmt in args.formats.split(","):
        for system in args.systems.split(","):
            rows += run(fmt, system, concurrencies, args.new, args.out)
    meta = {"cpu": describe_cpu(), "vllm": vllm.__version__, "cores": os.cpu_count(), "model_threads": max(1, os.cpu_count() - 1),
            "date": time.strftime("%Y-%m-%d"), "new": args.new}
    write(rows, meta, args.out)


if __name__ == "__main__":
    main()
