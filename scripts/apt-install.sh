# apt-install.sh - sourced by slurm-up.sh and chromium-up.sh: Debian packages installed the one way both need.
#
#   apt_install LOG PKG...   returns non-zero (its log's tail on stderr) when the packages could not be installed
#
# - waits up to DANET_APT_LOCK_TIMEOUT seconds (default 600) for the dpkg lock: the two scripts may run at once;
# - finishes an interrupted dpkg first (`dpkg --configure -a`): a machine image snapshotted mid-install leaves
#   packages half configured or a pending journal in $DPKG_ADMINDIR/updates, and then every apt-get install refuses
#   with "dpkg was interrupted";
# - keeps the packages' postinst from starting system-wide daemons (policy-rc.d), as there is no init system.

apt_install() {
  local log=$1; shift
  local lock=(-o DPkg::Lock::Timeout="${DANET_APT_LOCK_TIMEOUT:-600}")
  local ok=1 policy_made=0
  export DEBIAN_FRONTEND=noninteractive
  : >"$log"
  if [ -n "$(dpkg --audit 2>/dev/null)" ] || [ -n "$(ls -A "${DPKG_ADMINDIR:-/var/lib/dpkg}/updates" 2>/dev/null)" ]; then
    echo "apt-install: dpkg was left half done; finishing it (dpkg --configure -a)" >&2
    dpkg --configure -a >>"$log" 2>&1 || ok=0
  fi
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_made=1
  fi
  [ "$ok" = 1 ] && { apt-get "${lock[@]}" update -qq >>"$log" 2>&1 || ok=0; }
  [ "$ok" = 1 ] && { apt-get "${lock[@]}" install -y -qq --no-install-recommends "$@" >>"$log" 2>&1 || ok=0; }
  [ "$policy_made" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$ok" = 1 ] || { tail -n 5 "$log" >&2; return 1; }
}
