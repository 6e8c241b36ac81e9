#!/usr/bin/env bash
# Print the path of a promtool binary, fetching it once from Debian's `prometheus` package into a cache dir.
#
# Only the promtool binary is extracted (apt-get download + dpkg-deb -x); nothing is installed system-wide and no
# Prometheus daemon is started. Exit status 3: apt is unavailable on this machine (callers skip on it); 4: the
# download failed.
set -euo pipefail

cache_dir="${PROMTOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/slime-rl/promtool}"
promtool="$cache_dir/usr/bin/promtool"

if [[ -x "$promtool" ]] && "$promtool" --version >/dev/null 2>&1; then
  echo "$promtool"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "get-promtool: apt-get and dpkg-deb are needed to fetch Debian's prometheus package" >&2
  exit 3
fi

mkdir -p "$cache_dir"
download_dir="$(mktemp -d)"
trap 'rm -rf "$download_dir"' EXIT

fetch() {
  # apt-get download runs as the _apt user when it can; a private dir it cannot write only costs a warning.
  (cd "$download_dir" && apt-get download -q prometheus >/dev/null 2>"$download_dir/apt.log")
}

# A fresh machine may have no package lists yet; refresh them once and retry.
if ! fetch; then
  apt-get update -q >/dev/null 2>>"$download_dir/apt.log" || true
  if ! fetch; then
    echo "get-promtool: 'apt-get download prometheus' failed:" >&2
    cat "$download_dir/apt.log" >&2
    exit 4
  fi
fi

deb="$(ls "$download_dir"/prometheus_*.deb)"
extract_dir="$(mktemp -d "$cache_dir/extract.XXXXXX")"
dpkg-deb -x "$deb" "$extract_dir"
mkdir -p "$cache_dir/usr/bin"
# Rename into place so that a concurrent caller never sees a half-written binary.
mv -f "$extract_dir/usr/bin/promtool" "$promtool"
rm -rf "$extract_dir"
"$promtool" --version >/dev/null
echo "$promtool"
