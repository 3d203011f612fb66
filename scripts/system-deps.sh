#!/usr/bin/env bash
# Installs what pip cannot: the real Prometheus (and promtool) and the blackbox exporter, which the tests and
# benchmarks run on loopback ports. Debian packages; needs root (as CI and the dev machines have).
set -euo pipefail
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v prometheus-blackbox-exporter >/dev/null || missing+=(prometheus-blackbox-exporter)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "missing: ${missing[*]} (install them with your package manager; Debian: apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "installing ${missing[*]} (Debian packages)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages enable services; the tests start their own instances on free ports instead.
for service in prometheus prometheus-blackbox-exporter prometheus-node-exporter; do
  (service "$service" stop || true) >/dev/null 2>&1
done
