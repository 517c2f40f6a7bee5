#!/usr/bin/env bash
# What installing slug_lightning costs, at two commits: for each, a fresh virtual environment, torch and torchvision
# first (the same in both; TORCH="..." to change), then the package as `git archive` of the commit has it, with its
# dependencies (no extras). Prints, as Markdown on stdout: the size of site-packages with torch alone and with the
# package, what the package added, and the distributions only one of the two environments holds.
#
#   benchmarks/install_size.sh [BEFORE [AFTER]] > benchmarks/results/install_size.md
#
# BEFORE defaults to 662f5cb (before the dependencies were trimmed), AFTER to HEAD; run from the repository root.
# WORK=DIR keeps the environments and the lists in DIR; by default a temporary directory, deleted at the end.
set -euo pipefail
before=${1:-662f5cb}
after=${2:-HEAD}
torch_pins=${TORCH:-"torch==2.14.1 torchvision==0.29.1"}
if [[ -n "${WORK:-}" ]]; then
    work=$WORK
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi

kib() { du -sk "$1" | cut -f1; }
mib() { echo $(( ($1 + 512) / 1024 )); }

declare -A base added total
for side in before after; do
    commit=${!side}
    env="$work/$side"
    rm -rf "$env" "$env-src"
    mkdir -p "$env-src"
    git archive "$commit" | tar -x -C "$env-src"
    echo "[install_size] $side ($commit): torch" >&2
    python3 -m venv "$env"
    # shellcheck disable=SC2086  # the pins are separate words
    "$env/bin/pip" install -q --disable-pip-version-check $torch_pins
    site=$("$env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    base[$side]=$(kib "$site")
    echo "[install_size] $side ($commit): the package" >&2
    start=$SECONDS
    "$env/bin/pip" install -q --disable-pip-version-check "$env-src"
    echo "[install_size] $side: $((SECONDS - start)) s" >&2
    total[$side]=$(kib "$site")
    added[$side]=$(( ${total[$side]} - ${base[$side]} ))
    "$env/bin/pip" list --format=freeze --disable-pip-version-check | cut -d= -f1 | tr 'A-Z_' 'a-z-' | sort \
        > "$work/$side.txt"
done

echo "# Installed size: the package's dependencies before and after"
echo
echo "Machine: $(uname -m), $(nproc) CPUs, $(python3 --version), $("$work/after/bin/pip" --version | cut -d' ' -f1-2)." \
    "Measured by \`benchmarks/install_size.sh $before $after\` ($(git rev-parse --short "$before") against" \
    "$(git rev-parse --short "$after")): a fresh virtual environment each, \`pip install $torch_pins\`, then" \
    "\`pip install <the commit's tree>\` (no extras). Sizes are \`du -sk\` of site-packages, in MiB."
echo
echo "| commit | torch alone | with the package | the package added | distributions |"
echo "|---|---|---|---|---|"
for side in before after; do
    echo "| $side ($(git rev-parse --short "${!side}")) | $(mib "${base[$side]}") | $(mib "${total[$side]}")" \
        "| $(mib "${added[$side]}") | $(wc -l < "$work/$side.txt") |"
done
echo
echo "Added by the package: $(mib "${added[after]}") MiB against $(mib "${added[before]}") MiB" \
    "($(( (100 * ${added[after]} + ${added[before]} / 2) / ${added[before]} ))% of before)."
echo
only() {  # the distributions in list $1 and not in list $2, comma-separated, or "none"
    local names
    names=$(comm -23 "$1" "$2" | paste -sd ',' | sed 's/,/, /g')
    echo "${names:-none}"
}
echo "Only before ($(comm -23 "$work/before.txt" "$work/after.txt" | wc -l)): $(only "$work/before.txt" "$work/after.txt")."
echo
echo "Only after ($(comm -13 "$work/before.txt" "$work/after.txt" | wc -l)): $(only "$work/after.txt" "$work/before.txt")."
