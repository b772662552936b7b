#!/usr/bin/env bash
# A one-node SLURM on this machine, from Debian's packages, without systemd: for trying
# `tvlars sweep --launcher slurm` and for the tests marked `slurm` (tests/test_slurm_real.py).
#
#   sudo apt-get install -y slurm-wlm munge            # and slurmdbd mariadb-server for accounting
#   sudo scripts/slurm-local.sh start [--accounting]    # munged, slurmctld, slurmd (+ mariadb, slurmdbd)
#   scripts/slurm-local.sh status
#   sudo scripts/slurm-local.sh stop
#
# start is idempotent: daemons already up with the same configuration are left alone; a
# change of configuration (--accounting or not) restarts slurmctld and slurmd. It writes
# /etc/slurm/slurm.conf (and slurmdbd.conf) only where no such file exists or the one there
# is its own (first line below), so a real cluster's configuration is never overwritten.
# One partition, `debug`, of one node (`hostname -s`, every CPU); cores are the consumable.
#
# REQUEUE_DELAY_S (default 120, SLURM's): how long a requeued job waits before it may start
# again (AuthInfo cred_expire; squeue shows it as PENDING, Reason=BeginTime). The tests set
# it shorter to finish sooner; the default is what a real cluster does. MIN_JOB_AGE_S
# (default 300, SLURM's): how long squeue still shows a job that has ended.
set -euo pipefail

MARK="# written by tvlars scripts/slurm-local.sh"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
CLUSTER=tvlars-local
HOST=$(hostname -s)
CPUS=$(nproc)
DELAY=${REQUEUE_DELAY_S:-120}
MIN_JOB_AGE=${MIN_JOB_AGE_S:-300}
SPOOL_CTLD=/var/spool/slurmctld
SPOOL_D=/var/spool/slurmd
LOGS=/var/log/slurm
MYSQL_RUN=/run/mysqld

say() { echo "slurm-local: $*"; }
die() { echo "slurm-local: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process the file names runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM the process the file names, wait for it to go
    local name=$1 file=$2 pid i
    alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill "$pid"
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$file"
    say "stopped $name (pid $pid)"
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...: until the command succeeds
    local what=$1 seconds=$2 i
    shift 2
    for i in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up in ${seconds} s (logs: $LOGS)"
}

owned_or_absent() {  # a configuration file we may write
    [[ ! -e $1 ]] || head -n1 "$1" | grep -qxF "$MARK" || die "$1 exists and is not ours: left alone"
}

slurm_conf() {  # slurm_conf ACCOUNTING(yes|no)
    cat <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=$DELAY
StateSaveLocation=$SPOOL_CTLD
SlurmdSpoolDir=$SPOOL_D
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobRequeue=1
MinJobAge=$MIN_JOB_AGE
ReturnToService=2
SchedulerType=sched/backfill
JobCompType=jobcomp/none
EOF
    if [[ $1 == yes ]]; then
        echo "AccountingStorageType=accounting_storage/slurmdbd"
        echo "AccountingStorageHost=localhost"
        echo "JobAcctGatherType=jobacct_gather/linux"
    else
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobAcctGatherType=jobacct_gather/none"
    fi
    echo "NodeName=$HOST CPUs=$CPUS State=UNKNOWN"
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

start_munge() {
    alive /run/munge/munged.pid && return 0
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || die "no /etc/munge/munge.key: apt-get install -y munge"
    runuser -u munge -- /usr/sbin/munged
    wait_for munged 10 sh -c 'munge -n | unmunge'
    say "munged up"
}

start_accounting() {
    command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
        || die "--accounting needs slurmdbd and mariadb-server: apt-get install -y slurmdbd mariadb-server"
    if ! alive $MYSQL_RUN/mysqld.pid; then
        install -d -o mysql -g mysql -m 0755 $MYSQL_RUN
        runuser -u mysql -- /usr/sbin/mariadbd --datadir=/var/lib/mysql --socket=$MYSQL_RUN/mysqld.sock \
            --pid-file=$MYSQL_RUN/mysqld.pid --log-error=$LOGS/mariadb.log >/dev/null 2>&1 &
        wait_for mariadb 30 mariadb -e "select 1"
        mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
                    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
        say "mariadb up"
    fi
    if ! alive /run/slurmdbd.pid; then
        owned_or_absent $DBD_CONF
        cat >$DBD_CONF <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=/run/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
EOF
        chown slurm:slurm $DBD_CONF
        chmod 600 $DBD_CONF
        /usr/sbin/slurmdbd
        wait_for slurmdbd 30 sacctmgr -n show cluster
        say "slurmdbd up"
    fi
    sacctmgr -n -P show cluster format=cluster | grep -qx $CLUSTER || sacctmgr -i add cluster $CLUSTER >/dev/null
}

start() {
    local accounting=no
    [[ ${1:-} == --accounting ]] && accounting=yes
    [[ ${1:-} == "" || ${1:-} == --accounting ]] || die "start takes --accounting or nothing, not $1"
    [[ $(id -u) == 0 ]] || die "start needs root (munged, slurmd and the spool folders)"
    command -v slurmctld >/dev/null || die "no slurmctld: apt-get install -y slurm-wlm munge"
    owned_or_absent $CONF
    install -d -o slurm -g slurm -m 0755 $SPOOL_CTLD $SPOOL_D $LOGS
    start_munge
    local wanted
    wanted=$(slurm_conf $accounting)
    if [[ ! -f $CONF || $(cat $CONF) != "$wanted" ]]; then
        stop_pid slurmd /run/slurmd.pid
        stop_pid slurmctld /run/slurmctld.pid
        printf '%s\n' "$wanted" >$CONF
        say "wrote $CONF (accounting: $accounting)"
    fi
    if [[ $accounting == yes ]]; then start_accounting; fi  # sacctmgr reads slurm.conf
    if ! alive /run/slurmctld.pid; then
        /usr/sbin/slurmctld
        wait_for slurmctld 30 scontrol ping
        say "slurmctld up"
    fi
    if ! alive /run/slurmd.pid; then
        /usr/sbin/slurmd
        wait_for "node $HOST" 30 sh -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"
        say "slurmd up"
    fi
    status
}

stop() {
    stop_pid slurmd /run/slurmd.pid
    stop_pid slurmctld /run/slurmctld.pid
    stop_pid slurmdbd /run/slurmdbd.pid
    stop_pid mariadb $MYSQL_RUN/mysqld.pid
    stop_pid munged /run/munge/munged.pid
}

status() {
    local name file
    for name in munged:/run/munge/munged.pid mariadb:$MYSQL_RUN/mysqld.pid slurmdbd:/run/slurmdbd.pid \
                slurmctld:/run/slurmctld.pid slurmd:/run/slurmd.pid; do
        file=${name#*:}
        if alive "$file"; then say "${name%%:*} running (pid $(cat "$file"))"; else say "${name%%:*} not running"; fi
    done
    if alive /run/slurmctld.pid; then
        say "$(scontrol show config | grep -E '^AccountingStorageType' | tr -s ' ')"
        sinfo
    fi
}

case ${1:-} in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start [--accounting] | stop | status" >&2; exit 2 ;;
esac
