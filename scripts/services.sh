#!/usr/bin/env bash
# Start the local services the test suite needs, if they are not running: postgres | mariadb | all.
# Installs them from Debian's packages when missing (needs root and apt).
set -euo pipefail
want="${1:-all}"

have_port() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_install() {
  [ "$(id -u)" = 0 ] || { echo "services: not root, cannot install $*" >&2; return 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$@" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1; apt-get install -y -q "$@" >/dev/null; }
}

start_postgres() {
  if have_port 5432; then echo "services: postgresql already listening on 5432"; return 0; fi
  command -v pg_ctlcluster >/dev/null 2>&1 || apt_install postgresql
  local ver; ver="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)"
  if [ -z "$ver" ]; then
    ver="$(ls /usr/lib/postgresql | sort -V | tail -n1)"; pg_createcluster "$ver" main >/dev/null
  fi
  # trust auth on loopback for the test user postgres (a throwaway CI/dev server)
  local hba="/etc/postgresql/$ver/main/pg_hba.conf"
  if ! grep -q "charllm-ci" "$hba" 2>/dev/null; then
    sed -i '1i host all all 127.0.0.1/32 trust # charllm-ci\nhost all all ::1/128 trust # charllm-ci' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || pg_ctlcluster "$ver" main start
  for _ in $(seq 1 30); do have_port 5432 && break; sleep 1; done
  have_port 5432 && echo "services: postgresql started ($ver)"
}

start_mariadb() {
  if have_port 3306; then echo "services: mariadb already listening on 3306"; return 0; fi
  command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  for _ in $(seq 1 30); do have_port 3306 && break; sleep 1; done
  have_port 3306 && echo "services: mariadb started"
}

case "$want" in
  postgres) start_postgres ;;
  mariadb) start_mariadb ;;
  all) start_postgres; start_mariadb ;;
  *) echo "usage: $0 [postgres|mariadb|all]" >&2; exit 2 ;;
esac
