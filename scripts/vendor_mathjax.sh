#!/usr/bin/env bash
# Vendor MathJax 3 into book/_static/mathjax/ so that the book renders formulas offline.
#
#     scripts/vendor_mathjax.sh            # MathJax 3.2.2 (the default)
#     MATHJAX_VERSION=3 scripts/vendor_mathjax.sh   # the newest 3.x on npm
#
# Fetches the package from the npm registry with `npm pack` (nothing is installed, no node_modules),
# extracts its es5/ build (browser bundles and fonts) and its LICENSE and writes
# book/_static/mathjax/VERSION. Idempotent: does nothing when that version is already in place.
# _config.yml points Sphinx at it: sphinx.config.mathjax_path = mathjax/tex-mml-chtml.js, with
# book/_static in html_static_path. The folder is git-ignored; the Makefile calls this script before
# every book build.
set -euo pipefail

VERSION="${MATHJAX_VERSION:-3.2.2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/book/_static/mathjax"
ENTRY="tex-mml-chtml.js"

case "$VERSION" in
  3|3.*) ;;
  *) echo "vendor_mathjax: MATHJAX_VERSION=$VERSION, but the book is configured for MathJax 3 (3 or 3.x.y)" >&2; exit 2 ;;
esac

# Already vendored? (an exact version must match; "3" accepts any 3.x already there)
if [[ -f "$DEST/$ENTRY" && -f "$DEST/VERSION" ]]; then
  have="$(cat "$DEST/VERSION")"
  if [[ "$have" == "$VERSION" || ( "$VERSION" == "3" && "$have" == 3.* ) ]]; then
    echo "vendor_mathjax: MathJax $have already in ${DEST#"$ROOT"/}"
    exit 0
  fi
fi

if ! command -v npm >/dev/null 2>&1; then
  cat >&2 <<MSG
vendor_mathjax: npm is not installed, so MathJax cannot be fetched.
  Install Node.js + npm (Debian/Ubuntu: sudo apt-get install -y npm; or https://nodejs.org),
  then run scripts/vendor_mathjax.sh again. Without it the book's formulas will not render.
MSG
  exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "vendor_mathjax: fetching mathjax@$VERSION from the npm registry"
if ! (cd "$TMP" && npm pack --silent "mathjax@$VERSION" >"$TMP/pack.out" 2>"$TMP/pack.err"); then
  echo "vendor_mathjax: 'npm pack mathjax@$VERSION' failed:" >&2
  cat "$TMP/pack.err" >&2
  exit 1
fi
TARBALL="$TMP/$(tail -n 1 "$TMP/pack.out")"
[[ -f "$TARBALL" ]] || { echo "vendor_mathjax: npm pack wrote no tarball (output: $(cat "$TMP/pack.out"))" >&2; exit 1; }

tar -xzf "$TARBALL" -C "$TMP" package/es5 package/LICENSE package/package.json
[[ -f "$TMP/package/es5/$ENTRY" ]] || { echo "vendor_mathjax: $ENTRY missing from the package" >&2; exit 1; }
got="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$TMP/package/package.json")"

# Replace the folder in one step, so a failed run never leaves half a MathJax behind.
mkdir -p "$(dirname "$DEST")"
STAGE="$(dirname "$DEST")/.mathjax.tmp"
rm -rf "$STAGE"
cp -R "$TMP/package/es5" "$STAGE"
cp "$TMP/package/LICENSE" "$STAGE/LICENSE"
echo "$got" >"$STAGE/VERSION"
rm -rf "$DEST"
mv "$STAGE" "$DEST"
echo "vendor_mathjax: MathJax $got -> ${DEST#"$ROOT"/} ($(du -sh "$DEST" | cut -f1))"
