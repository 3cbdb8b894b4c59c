#!/usr/bin/env bash
# The CHANGELOG.md section of one version, for release notes:
#   scripts/release-notes.sh 0.2.0
# Fails when the version has no section (a tag must come with its changelog).
set -euo pipefail
version=${1:?usage: release-notes.sh VERSION}
cd "$(dirname "$0")/.."
notes=$(awk -v v="$version" '
  /^## \[/ { if (on) exit; on = (index($0, "## [" v "]") == 1); next }
  on { print }
' CHANGELOG.md)
if [ -z "${notes//[[:space:]]/}" ]; then
  echo "release-notes: CHANGELOG.md has no section for $version" >&2
  exit 1
fi
printf '%s\n' "$notes"
