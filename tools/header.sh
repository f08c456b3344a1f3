# Sourced by the shell tools for -h/--help: print_header FILE prints FILE's header comment (its
# lines from 2 to the `set -` line) without the comment marks.
print_header() { sed -n '2,/^set -/{/^set -/d;s/^# \{0,1\}//;p;}' "$1"; }
