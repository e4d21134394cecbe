#!/bin/bash
# The three real-text corpora of issue 28, from Debian packages that install offline:
#   kjv  - the King James Bible (bible-kjv), word level, as scripts/prepare_bible.py prepares it
#   perl - Perl's POD documentation (perl-doc), rendered with pod2text, 8000 SentencePiece pieces
#   perlfiles - the same text with valid and test drawn by file (--split-by-file 1): perl's
#          contiguous valid split is 71% perluniprops, a table of Unicode properties
#   man  - the Linux man pages (manpages, manpages-dev), rendered with groff, 8000 pieces
# Usage: prepare_corpora.sh DEST_ROOT   (run from the repository root; writes DEST_ROOT/{kjv,perl,perlfiles,man}
# and the rendered text under DEST_ROOT/text)
set -euo pipefail
root=${1:?usage: prepare_corpora.sh DEST_ROOT}
python=${PYTHON:-python}
apt-get install -y bible-kjv perl-doc manpages manpages-dev groff-base > /dev/null
mkdir -p "$root/text/perl" "$root/text/man"

[ -d "$root/kjv" ] || "$python" scripts/prepare_bible.py --dest "$root/kjv"

if [ ! -d "$root/perl" ]; then
  for pod in /usr/share/perl/5.*/pod/*.pod; do
    pod2text --utf8 -w 80 "$pod" > "$root/text/perl/$(basename "$pod" .pod).txt"
  done
  "$python" scripts/prepare_text.py --input "$root/text/perl" --dest "$root/perl" \
    --spm-vocab-size 8000
fi
[ -d "$root/perlfiles" ] || "$python" scripts/prepare_text.py --input "$root/text/perl" \
  --dest "$root/perlfiles" --spm-vocab-size 8000 --split-by-file 1

if [ ! -d "$root/man" ]; then
  # the packages' own pages; a page that only includes another (.so, under 200 bytes) is dropped
  dpkg -L manpages manpages-dev | grep -E '/man/man[0-9]/[^/]+\.gz$' | sort | while read -r page; do
    [ -L "$page" ] && continue
    [ "$(zcat "$page" | wc -c)" -lt 200 ] && continue
    name=$(basename "$(dirname "$page")")_$(basename "$page" .gz)
    zcat "$page" | groff -man -Tutf8 -P -cbou 2> /dev/null > "$root/text/man/$name.txt"
  done
  "$python" scripts/prepare_text.py --input "$root/text/man" --dest "$root/man" \
    --spm-vocab-size 8000
fi
