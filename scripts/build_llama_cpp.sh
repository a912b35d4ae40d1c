#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-bench from the llama.cpp tree that PyPI's
# llama-cpp-python source distribution vendors: no prebuilt llama.cpp binary can be fetched
# here, and PyPI is reachable.  The build lands in a cache folder keyed by that version, so a
# machine pays for it once (about 10 minutes on 2 cores); the tree stays beside it for
# convert_hf_to_gguf.py, which makes the bfloat16 GGUF.
#
#   scripts/build_llama_cpp.sh PIP [VERSION]     prints nothing on success; the folder is
#   $YAYI_LLAMA_CPP_HOME (default ~/.cache/yayi-serve/llama.cpp-VERSION)
#
# A failed build leaves no half-made folder and fails only this step: the other engines
# still install and serve, and `--engine llama-cpp` says what is missing.
set -euo pipefail
PIP=${1:?usage: build_llama_cpp.sh PIP [VERSION]}
VERSION=${2:-0.3.36}
HOME_DIR=${YAYI_LLAMA_CPP_HOME:-$HOME/.cache/yayi-serve/llama.cpp-$VERSION}
# The CPU's own instruction set (-march=native) less AMX: where the compiler sees AMX, ggml takes
# repacked weights into its AMX buffer, whose kernels for a batch of more than one token died with
# SIGILL (every thread at one instruction) on the Sapphire Rapids machine this was built on, while
# without repacking Q4_0 prompts run at about two thirds of the speed (docs/engines.md). GCC lets an
# explicit -mno-* win over -march=native whatever their order. A cache built with other flags is
# rebuilt.
BUILD_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [ -x "$HOME_DIR/bin/llama-server" ] && [ -f "$HOME_DIR/src/convert_hf_to_gguf.py" ] \
  && [ "$(cat "$HOME_DIR/BUILD_FLAGS" 2>/dev/null)" = "$BUILD_FLAGS" ]; then
  exit 0
fi
mkdir -p "$(dirname "$HOME_DIR")"
WORK=$(mktemp -d "$(dirname "$HOME_DIR")/.llama.cpp-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "building llama.cpp (llama-cpp-python $VERSION's tree) into $HOME_DIR, once: about 10 minutes" >&2
"$PIP" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
tar -xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
# Static, CPU only, no network at build or run time (no curl, no HTTPS, no prebuilt web UI).
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$BUILD_FLAGS" -DCMAKE_CXX_FLAGS="$BUILD_FLAGS" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >"$WORK/cmake.log" 2>&1 \
  || { tail -30 "$WORK/cmake.log" >&2; exit 1; }
cmake --build "$WORK/build" --target llama-server llama-bench -j "$(nproc)" >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log" >&2; exit 1; }
STAGE="$WORK/stage"
mkdir -p "$STAGE/bin" "$STAGE/src"
cp "$WORK/build/bin/llama-server" "$WORK/build/bin/llama-bench" "$STAGE/bin/"
# The converter and what it imports (its conversion/ and gguf-py/ folders).
cp -r "$SRC/convert_hf_to_gguf.py" "$SRC/conversion" "$SRC/gguf-py" "$STAGE/src/"
echo "$VERSION" >"$STAGE/VERSION"
echo "$BUILD_FLAGS" >"$STAGE/BUILD_FLAGS"
rm -rf "$HOME_DIR"
mv "$STAGE" "$HOME_DIR"
