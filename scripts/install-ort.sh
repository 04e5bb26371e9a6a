#!/usr/bin/env bash
# Installs the ONNX Runtime shared library used by package ortrun (tests and
# `onnxlora verify`). The library is taken from the npm package
# onnxruntime-node, which ships a prebuilt libonnxruntime.so.1 for Linux;
# npm is the only channel needed, and no install scripts are run.
#
# Usage: scripts/install-ort.sh
# Env:
#   ONNXLORA_CACHE        cache root (default: $HOME/.cache/onnxlora)
#   ONNXLORA_ORT_TARBALL  optional path to a pre-downloaded
#                         onnxruntime-node-<version>.tgz (skips npm pack)
# The last line on stdout is the path of the installed library; everything
# else goes to stderr. Idempotent: does nothing if the library is present.
set -euo pipefail

ORT_VERSION=1.30.0

cache_root="${ONNXLORA_CACHE:-$HOME/.cache/onnxlora}"
dest_dir="$cache_root/ort-$ORT_VERSION"
dest="$dest_dir/libonnxruntime.so.1"

if [[ -s "$dest" ]]; then
	echo "$dest"
	exit 0
fi

# The npm package carries Linux builds for x64 and arm64 only.
case "$(uname -s)/$(uname -m)" in
Linux/x86_64) arch=x64 ;;
Linux/aarch64 | Linux/arm64) arch=arm64 ;;
*)
	echo "install-ort.sh: unsupported platform $(uname -s)/$(uname -m) (need Linux x86_64 or aarch64)" >&2
	exit 1
	;;
esac
member="package/bin/napi-v6/linux/$arch/libonnxruntime.so.1"

mkdir -p "$dest_dir"
# Temp dir inside dest_dir so the final mv is an atomic rename.
tmp="$(mktemp -d "$dest_dir/.install.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

tarball="${ONNXLORA_ORT_TARBALL:-}"
if [[ -n "$tarball" ]]; then
	if [[ ! -f "$tarball" ]]; then
		echo "install-ort.sh: ONNXLORA_ORT_TARBALL=$tarball does not exist" >&2
		exit 1
	fi
else
	if ! command -v npm >/dev/null 2>&1; then
		echo "install-ort.sh: npm not found (install node/npm, or set ONNXLORA_ORT_TARBALL)" >&2
		exit 1
	fi
	echo "install-ort.sh: fetching onnxruntime-node@$ORT_VERSION with npm pack" >&2
	# npm pack only downloads the tarball (registry integrity is checked by
	# npm); its stdout goes to stderr so our last stdout line is the path.
	(cd "$tmp" && npm pack --ignore-scripts --silent "onnxruntime-node@$ORT_VERSION" >&2)
	tarball="$tmp/onnxruntime-node-$ORT_VERSION.tgz"
	if [[ ! -f "$tarball" ]]; then
		echo "install-ort.sh: npm pack did not produce $tarball" >&2
		exit 1
	fi
fi

tar -xzf "$tarball" -C "$tmp" "$member"
lib="$tmp/$member"
# Guard against a truncated or wrong member before publishing it.
if [[ ! -s "$lib" || "$(head -c 4 "$lib" | od -An -c | tr -d ' ')" != '177ELF' ]]; then
	echo "install-ort.sh: $member in $tarball is not an ELF library" >&2
	exit 1
fi
chmod 0644 "$lib"
mv -f "$lib" "$dest"
echo "install-ort.sh: installed ONNX Runtime $ORT_VERSION" >&2
echo "$dest"
