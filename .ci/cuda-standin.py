"""Let a CUDA build of torch import on a machine without CUDA's libraries (.ci/newest-torch, .ci/other-python).

Run with the Python whose torch it patches: `"$venv/bin/python" .ci/cuda-standin.py`.

PyPI's Linux x86_64 torch is a CUDA build, and its libraries link against CUDA's (the nvidia-*,
cuda-* and triton requirements, 2.5 GB beside a 539 MB torch wheel). This builds one small library
that defines every CUDA symbol torch's libraries import, each call returning 100
(cudaErrorNoDevice; an error in every CUDA API), so torch sees no GPU. It goes into torch/lib, which
every torch library's RPATH ($ORIGIN) searches before the system's library path, under each CUDA
library name torch links against (but libcuda.so.1, the driver, which only lazily loaded parts
need). A CPU build is left alone. Needs gcc and readelf; takes a second, so the scripts rerun it.
"""

import collections
import importlib.util
import pathlib
import re
import shutil
import subprocess
import tempfile

lib = pathlib.Path(importlib.util.find_spec("torch").submodule_search_locations[0]) / "lib"
stub = lib / "libcuda-standin.so"
system = re.compile(r"(GLIBC|GLIBCXX|CXXABI|GCC|GOMP|OMP)_")  # symbol versions the system provides
unversioned = re.compile(r"(nccl|cuFile|cusparseLt|nvshmem)")  # CUDA APIs imported with no version
sonames, nodes, objects = set(), collections.defaultdict(set), set()


def readelf(so: pathlib.Path, what: str) -> str:
    return subprocess.run(["readelf", "-W", what, so], check=True, capture_output=True, text=True).stdout


for so in sorted(set(lib.glob("*.so")) - {stub}):
    sonames |= {n for n in re.findall(r"\(NEEDED\).*\[(.*)\]", readelf(so, "-d")) if re.match(r"lib(cu|nv|nccl)", n)}
    for f in (line.split() for line in readelf(so, "--dyn-syms").splitlines()):
        if len(f) >= 8 and f[6] == "UND":
            name, _, version = f[7].partition("@")
            if (version and not system.match(version)) or (not version and unversioned.match(name)):
                nodes[version.split(" ")[0]].add(name)
                if f[3] == "OBJECT":
                    objects.add(name)
sonames.discard("libcuda.so.1")
if not sonames:
    raise SystemExit(0)  # a CPU build: nothing to stand in for
c = ['static const char msg[] = "CUDA stand-in: no GPU";']
for name in sorted(set().union(*nodes.values())):
    if name in objects:
        c.append(f"long {name}[64];")
    elif re.search(r"(Error|Result)(String|Name)$", name):
        c.append(f"const char *{name}(void) {{ return msg; }}")
    else:
        c.append(f"int {name}(void) {{ return 100; }}")
tmp = pathlib.Path(tempfile.mkdtemp())
src, vmap = tmp / "cuda-standin.c", tmp / "cuda-standin.map"
src.write_text("\n".join(c) + "\n")
vmap.write_text("".join(f"{v} {{ global: {'; '.join(sorted(s))}; }};\n" for v, s in sorted(nodes.items()) if v))
subprocess.run(
    ["gcc", "-shared", "-fPIC", "-w", "-o", stub, src, f"-Wl,--version-script={vmap}", f"-Wl,-soname,{stub.name}"],
    check=True,
)
shutil.rmtree(tmp)
for name in sonames:
    (lib / name).unlink(missing_ok=True)
    (lib / name).symlink_to(stub.name)
