#!/bin/sh
# Enrolls every agent's node key with the collector, so the collector
# accepts (and pins) each node's audit stream. Run it after the agents
# start and whenever nodes join; an enrolled node is left as it is, and a
# node whose key changed is refused until you enroll it with --replace.
#
#   deploy/kubernetes/enroll-nodes.sh [NAMESPACE]
#
# Needs kubectl with get/list on pods and create on pods/exec in the
# namespace (Role portcullis-enroller in rbac.yaml).
set -eu
ns="${1:-portcullis-system}"
collector="statefulset/portcullis-collector"
status=0
for pod in $(kubectl -n "$ns" get pods -l app.kubernetes.io/name=portcullis-agent -o name); do
    st=$(kubectl -n "$ns" exec "$pod" -- /portcullis agent status \
        --config /etc/portcullis/config/agent.toml) || st=""
    # The agent's own node id (agent.node_id; the host name by default).
    node=$(printf '%s\n' "$st" | sed -n 's/^node_id \(.*\)$/\1/p')
    key=$(printf '%s\n' "$st" | sed -n 's/^node_key \([0-9a-f]\{64\}\)$/\1/p')
    node="${node:-$pod}"
    if [ -z "$key" ]; then
        echo "$node: no node key yet (is the agent running?)" >&2
        status=1
        continue
    fi
    if kubectl -n "$ns" exec "$collector" -- /portcullis collector enroll \
        --out /var/lib/portcullis-collector "$node" "$key"; then
        echo "$node: enrolled $key"
    else
        status=1
    fi
done
exit "$status"
