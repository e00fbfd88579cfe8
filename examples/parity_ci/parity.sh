#!/usr/bin/env bash
# Record (`parity.sh record`) or check (`parity.sh`) a model's parity snapshot.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
NGPT="${NGPT:-ngpt}"
MODEL="${MODEL:?set MODEL to a checkpoint or compiled directory}"
RECORD="${RECORD:-model.parity}"
PROMPTS="${PROMPTS:-$here/prompts.txt}"
if [[ "${1:-check}" == record ]]; then
  "$NGPT" snapshot "$MODEL" --prompts "$PROMPTS" -o "$RECORD"
else
  "$NGPT" check "$RECORD" "$MODEL"
fi
