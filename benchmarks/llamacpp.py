"""The llama.cpp side: llama.cpp's own `llama-bench` on the LLaMA half of the same weights (not a test).

    python -m benchmarks.llamacpp --build      download llama-cpp-python's source distribution from PyPI (pip),
                                               build llama.cpp's llama-bench from its vendor/llama.cpp
                                               (Release, CPU only, the instruction sets
                                               /proc/cpuinfo reports except AMX,
                                               no libcurl/OpenSSL)
    python -m benchmarks.llamacpp --preset mid [--types f32,f16,q8_0] [--threads 2]
                                               convert and measure alone (the main benchmark does it too)

Everything lives in the cache folder ($LLAVA_LLAMACPP_CACHE, default .cache/llamacpp): the sdist, its
unpacked tree, the build, and the GGUF files. Conversion: the fixture's `language_model.*` tensors are
renamed to an HF `LlamaForCausalLM` folder (its config is the fixture's text_config; tokenizer files copied),
then llama.cpp's own `convert_hf_to_gguf.py --outtype f32|f16|q8_0` writes the GGUF (its python package
`gguf` is the one in the llama.cpp tree; torch, numpy, sentencepiece, safetensors and transformers are the
test extras').

Measured with `llama-bench -t THREADS -r REPS -o json`: `-p PROMPT -n 0` is the prefill of PROMPT tokens from
an empty context; `-p 0 -n NEW -d PROMPT` decodes NEW tokens after a PROMPT-token context (the KV cache filled
first, `--n-depth`). llama-bench feeds random token ids: speed depends on the count, not on the ids. llama.cpp
has no vision tower here, so its time to first token is our CLIP time + its prefill (compare.py).
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

from . import system
from .workload import ROOT

CACHE = os.environ.get("LLAVA_LLAMACPP_CACHE", os.path.join(ROOT, ".cache", "llamacpp"))
PACKAGE = "llama-cpp-python"
TYPES = ("f32", "f16", "q8_0")
# This build's ggml uses OpenMP; libgomp's threads spin while they wait. On a 2-core machine that other
# processes share, 2 spinning threads collapsed decode of `mid` f32 to 1.3 tokens/s (17.5 with 1 thread, 23
# with 2 threads waiting passively), so llama-bench runs with passive waiting.
BENCH_ENV = dict(os.environ, OMP_WAIT_POLICY="passive")


class NotBuilt(Exception):
    """llama-bench is not in the cache folder (build it with --build)."""


def _say(msg):
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def source_dir(cache=CACHE):
    """vendor/llama.cpp of the newest unpacked llama-cpp-python sdist in the cache, or None."""
    found = sorted(glob.glob(os.path.join(cache, "llama_cpp_python-*", "vendor", "llama.cpp")))
    return found[-1] if found else None


def bench_binary(cache=CACHE):
    src = source_dir(cache)
    path = src and os.path.join(src, "build", "bin", "llama-bench")
    if not path or not os.access(path, os.X_OK):
        raise NotBuilt(f"no llama-bench under {cache} (python -m benchmarks.llamacpp --build)")
    return path


def version(cache=CACHE):
    """The llama-cpp-python sdist folder name (its version) and llama.cpp's build info line."""
    src = source_dir(cache)
    info = subprocess.run([bench_binary(cache), "--version"], capture_output=True, text=True)
    return {"sdist": os.path.basename(os.path.dirname(os.path.dirname(src))),
            "build": [line for line in (info.stdout + info.stderr).strip().splitlines() if line.strip()]}


# ggml option -> the /proc/cpuinfo flags it needs. AMX stays off: -march=native turns it on where the CPU has
# it, and under a kernel or hypervisor that does not grant AMX state the q8_0 kernels die with SIGILL at
# their first `tilezero` (seen on an AVX-512 + AMX Xeon VM here); every other instruction set the CPU
# reports is used, as -march=native would.
ISA_FLAGS = {"AVX": ("avx",), "AVX2": ("avx2",), "FMA": ("fma",), "F16C": ("f16c",), "BMI2": ("bmi2",),
             "AVX_VNNI": ("avx_vnni",), "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
             "AVX512_VBMI": ("avx512vbmi",), "AVX512_VNNI": ("avx512_vnni",), "AVX512_BF16": ("avx512_bf16",),
             "AMX_TILE": None, "AMX_INT8": None, "AMX_BF16": None}


def instruction_sets(cpuinfo="/proc/cpuinfo"):
    """{ggml option: on?} for this CPU (x86_64), from ISA_FLAGS."""
    with open(cpuinfo) as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return {name: bool(need) and all(x in flags for x in need) for name, need in ISA_FLAGS.items()}


def build(cache=CACHE, jobs=1):
    """pip download the sdist (if not cached), unpack it, cmake-build llama-bench and llama-server (the serving
    benchmark's peer; ~40 min with 1 job on a busy 2-core machine)."""
    os.makedirs(cache, exist_ok=True)
    if not glob.glob(os.path.join(cache, "llama_cpp_python-*.tar.gz")):
        _say(f"pip download --no-binary :all: --no-deps {PACKAGE} ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", PACKAGE,
                        "-d", cache], check=True)
    if source_dir(cache) is None:
        sdist = sorted(glob.glob(os.path.join(cache, "llama_cpp_python-*.tar.gz")))[-1]
        _say(f"unpacking {os.path.basename(sdist)} ...")
        shutil.unpack_archive(sdist, cache)
    src = source_dir(cache)
    # Unix Makefiles: with Ninja, this tree's configure step regenerates a file on every run and ninja
    # stops with "manifest 'build.ninja' still dirty after 100 tries".
    isa = instruction_sets()
    configure = ["cmake", "-S", src, "-B", os.path.join(src, "build"), "-G", "Unix Makefiles",
                 "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_CUDA=OFF", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=ON"] + [f"-DGGML_{name}={'ON' if on else 'OFF'}" for name, on in isa.items()]
    _say(f"cmake (Release, CPU only, {' '.join(n for n, on in isa.items() if on)}) ...")
    subprocess.run(configure, check=True)
    subprocess.run(["nice", "cmake", "--build", os.path.join(src, "build"), "-j", str(jobs), "--target",
                    "llama-bench", "llama-server"], check=True)
    return bench_binary(cache)


def server_binary(cache=CACHE):
    src = source_dir(cache)
    path = src and os.path.join(src, "build", "bin", "llama-server")
    if not path or not os.path.exists(path):
        raise NotBuilt(f"no llama-server under {cache} (python -m benchmarks.llamacpp --build)")
    return path


# ---------------------------------------------------------------------------------------------- weights
def llama_folder(hf_dir, out):
    """The fixture's LLaMA half as an HF LlamaForCausalLM folder: language_model.{model.*,lm_head.*} ->
    {model.*,lm_head.*}, config = text_config, tokenizer files copied. One shard in memory at a time."""
    from safetensors.numpy import load_file, save_file
    tmp = f"{out}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    text = dict(cfg["text_config"], architectures=["LlamaForCausalLM"], model_type="llama",
                torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=cfg.get("pad_token_id"),
                tie_word_embeddings=False)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(text, f, indent=1)
    index = {}
    for i, shard in enumerate(sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))):
        tensors = {k[len("language_model."):]: v for k, v in load_file(shard).items()
                   if k.startswith("language_model.")}
        if tensors:
            name = f"model-{i:05d}.safetensors"
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
            index.update({k: name for k in tensors})
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f, indent=1)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if os.path.exists(os.path.join(hf_dir, name)):
            shutil.copy(os.path.join(hf_dir, name), tmp)
    os.replace(tmp, out)
    return out


def _llama_folder_path(hf_dir, cache):
    return os.path.join(cache, "gguf", f"{os.path.basename(os.path.normpath(hf_dir))}-llama")


def drop_llama_folder(hf_dir, cache=CACHE):
    """Remove the renamed copy gguf_file made (the GGUF files stay): 13 GB for the 7B."""
    shutil.rmtree(_llama_folder_path(hf_dir, cache), ignore_errors=True)


def gguf_file(hf_dir, outtype, cache=CACHE, log=None):
    """cache/gguf/<fixture>-<outtype>.gguf, converted with llama.cpp's convert_hf_to_gguf.py if missing."""
    name = os.path.basename(os.path.normpath(hf_dir))
    path = os.path.join(cache, "gguf", f"{name}-{outtype}.gguf")
    if os.path.exists(path):
        return path
    src = source_dir(cache)
    folder = _llama_folder_path(hf_dir, cache)
    if not os.path.isdir(folder):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        llama_folder(hf_dir, folder)
    tmp = f"{path}.tmp-{os.getpid()}"
    _say(f"convert_hf_to_gguf.py --outtype {outtype} ...")
    env = dict(os.environ, PYTHONPATH=os.path.join(src, "gguf-py"))
    with open(log or os.devnull, "ab") as err:
        subprocess.run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), folder, "--outfile", tmp,
                        "--outtype", outtype], check=True, env=env, stdout=err, stderr=err)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- measuring
def llama_bench(model, threads, prompt=0, gen=0, depth=0, reps=3, cache=CACHE):
    """One llama-bench test -> {tok_s, tok_s_all, wall_s, peak_rss_mb, background_cores, ...}."""
    import tempfile
    argv = [bench_binary(cache), "-m", model, "-t", str(threads), "-p", str(prompt), "-n", str(gen),
            "-d", str(depth), "-r", str(reps), "-o", "json"]
    with tempfile.TemporaryFile() as err:
        busy0, t0 = system.busy_seconds(), time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=BENCH_ENV)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        busy = system.busy_seconds() - busy0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"llama-bench failed ({proc.returncode}): {err.read()[-2000:].decode(errors='replace')}")
    rows = [r for r in json.loads(out) if r["n_prompt"] == prompt and r["n_gen"] == gen]
    row = rows[0]
    return {"tok_s": row["avg_ts"], "tok_s_all": row["samples_ts"], "wall_s": wall,
            "n_threads": row["n_threads"], "flash_attn": row.get("flash_attn"), "cpu_info": row.get("cpu_info"),
            "build_commit": row.get("build_commit"), "model_size": row["model_size"],
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "background_cores": max(0.0, busy - usage.ru_utime - usage.ru_stime) / wall}


def measure(hf_dir, threads, prompt, new_tokens, types=TYPES, reps=3, cache=CACHE, log=None):
    """Per GGUF type: prefill of `prompt` tokens and decode of `new_tokens` after a `prompt`-token context.
    -> {"version", "types": {type: {...}}}; raises NotBuilt when llama-bench is missing."""
    bench_binary(cache)
    result = {"version": version(cache), "threads": threads, "env": {"OMP_WAIT_POLICY": "passive"},
              "prompt_tokens": prompt,
              "new_tokens": new_tokens, "types": {}}
    for outtype in types:
        model = gguf_file(hf_dir, outtype, cache, log)
        _say(f"{outtype}: prefill {prompt} tokens, decode {new_tokens} after {prompt} ...")
        try:
            pre = llama_bench(model, threads, prompt=prompt, reps=reps, cache=cache)
            dec = llama_bench(model, threads, gen=new_tokens, depth=prompt, reps=reps, cache=cache)
        except RuntimeError as e:              # one type failing (e.g. SIGILL in a kernel) keeps the others
            _say(f"{outtype}: {e}")
            result.setdefault("failed", {})[outtype] = str(e).splitlines()[0]
            continue
        result["types"][outtype] = {"gguf_mb": os.path.getsize(model) / 1e6, "prefill": pre, "decode": dec,
                                    "prefill_tok_s": pre["tok_s"], "prefill_s": prompt / pre["tok_s"],
                                    "decode_tok_s": dec["tok_s"]}
        _say(f"{outtype}: prefill {pre['tok_s']:.1f} tok/s, decode {dec['tok_s']:.2f} tok/s "
             f"(other processes: {pre['background_cores']:.2f} / {dec['background_cores']:.2f} cores)")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="download and build llama-bench if not cached")
    ap.add_argument("--jobs", type=int, default=1, help="--build: parallel compile jobs")
    ap.add_argument("--preset", choices=("tiny", "mid"))
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=595)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    if args.build:
        try:
            print(bench_binary())
        except NotBuilt:
            print(build(jobs=args.jobs))
    if args.preset:
        from .workload import fixture_dir
        try:
            res = measure(fixture_dir(args.preset), args.threads, args.prompt, args.new_tokens,
                          args.types.split(","), args.reps)
        except NotBuilt as e:
            print(f"llama.cpp: not built ({e})")
            return 1
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
