"""Turns the FAILOVER_MS line the fencing test prints into one results.jsonl row (benches/run.sh)."""
import json
import re
import sys

line = next(l for l in open(sys.argv[1]) if l.startswith("FAILOVER_MS"))
values = dict(re.findall(r"(\w+)=(\d+)", line))
rooms = [int(x) for x in re.search(r"per_room=\[([\d, ]*)\]", line).group(1).split(",") if x.strip()]
print(json.dumps({"scenario": "failover", "target": "roomwire", "run": int(sys.argv[2]),
                  "min_ms": int(values["min"]), "median_ms": int(values["median"]),
                  "max_ms": int(values["max"]), "node_ttl_ms": int(values["node_ttl_ms"]),
                  "per_room_ms": rooms}))
