# The shared start of the session scripts, sourced with the group as $1: strict mode, the train command, the
# command's time budget (LIMIT seconds, 570 unless set) and ftfy from the carried wheels (.whl, see README).
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
T="python3 -m turbovid.cli train"
START=$(date +%s)
left() { echo $(( (${LIMIT:-570} - ($(date +%s) - START)) )); }     # seconds left in this command
minutes_left() { python3 -c "print(max(0.5, ($(left) - $1) / 60))"; }  # minus a reserve, in minutes
echo "group $1: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
python3 -m pip install --no-deps -q .whl/ftfy-*.whl .whl/wcwidth-*.whl && python3 -c "import ftfy"
