# ci/lib.sh: what the bash scripts in ci/ share. Source it (`. ci/lib.sh`);
# it defines functions only and runs nothing.
#
#   cpi_request METHOD ARGS_JSON [DIRECTOR_UUID [REQUEST_ID]]
#       prints one request as the director sends it (API version 2).
#   cpi_exec CPI CONFIG
#       runs CPI on CONFIG as the director does: the request on stdin, the
#       response on stdout, a cleared environment (PATH and HOME only); stderr
#       is appended to $CPI_LOG (default /dev/null).
#   cpi_result
#       reads a response on stdin; prints its result as JSON, or fails with
#       "error: TYPE: MESSAGE" on stderr when the response holds an error.
#   json_get FILE|- [KEY...]
#       prints the value at KEY... (array indexes are numbers) of a JSON
#       document: a string as is, anything else as JSON.
#   median NUMBER...
#       prints the median.
#   xml_names_path_under DIR...
#       reads libvirt XML (a domain's, a pool's) on stdin; succeeds when a
#       file or directory it names (file=, dir=, path=, <path>) lies under
#       one of the DIRs.

cpi_request() {
  printf '{"method":"%s","arguments":%s,"context":{"director_uuid":"%s","request_id":"%s"},"api_version":2}' \
    "$1" "$2" "${3:-ci}" "${4:-cpi-000000}"
}

cpi_exec() {
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="${HOME:-/root}" "$1" "$2" 2>>"${CPI_LOG:-/dev/null}"
}

cpi_result() {
  python3 -c '
import json, sys
r = json.load(sys.stdin)
e = r["error"]
if e is not None:
    sys.exit("error: " + e["type"] + ": " + e["message"])
print(json.dumps(r["result"]))'
}

json_get() {
  python3 -c '
import json, sys
v = json.load(sys.stdin if sys.argv[1] == "-" else open(sys.argv[1]))
for k in sys.argv[2:]:
    v = v[int(k)] if isinstance(v, list) else v[k]
print(v if isinstance(v, str) else json.dumps(v))' "$@"
}

median() {
  python3 -c 'import statistics, sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"
}

xml_names_path_under() {
  python3 -c '
import os, sys, xml.etree.ElementTree as ET
tops = [os.path.realpath(d) for d in sys.argv[1:]]
try:
    doc = ET.parse(sys.stdin).getroot()
except ET.ParseError:  # no XML: the object is gone
    sys.exit(1)
paths = [v for e in doc.iter() for k, v in e.attrib.items() if k in ("file", "dir", "path")]
paths += [e.text.strip() for e in doc.iter("path") if e.text]
under = [p for p in paths for t in tops
         if os.path.isabs(p) and os.path.commonpath([t, os.path.realpath(p)]) == t]
sys.exit(0 if under else 1)' "$@"
}
