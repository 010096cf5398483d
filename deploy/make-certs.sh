#!/usr/bin/env bash
# Certificates and keys of a neurofed deployment: the operator's certificate authority (CA), the
# coordinator's TLS certificate signed by it, and (optionally) a site's SuperNode authentication key pair.
# Run `deploy/make-certs.sh --help` for what it writes.
set -euo pipefail

PROG=$(basename "$0")
CA_DAYS=3650
SERVER_DAYS=825
# The coordinator's own tools (`neurofed run`, `flwr`) reach its Control API on loopback, so the
# certificate always names loopback as well as the hosts the sites dial.
LOOPBACK_NAMES=(localhost 127.0.0.1 ::1)

usage() {
    cat <<EOF
Usage:
  $PROG [--days N] [--ca-days N] [--ca-name NAME] OUT_DIR [HOST ...]
  $PROG --renew-server [--days N] OUT_DIR [HOST ...]
  $PROG --site-key OUT_DIR [NAME]

Make the certificates of a neurofed deployment with openssl. Private keys are written with mode 0600;
every file is made in a temporary folder inside OUT_DIR and moved into place only when all succeeded.

First run (at the coordinator): makes the certificate authority and the coordinator's certificate.
  OUT_DIR/ca.key       the CA's private key (0600). Keep it offline if you can: whoever holds it can
                       impersonate the coordinator. It is needed again only to renew server.crt.
  OUT_DIR/ca.crt       the CA certificate (valid --ca-days, default $CA_DAYS). Give it to every site
                       (\`neurofed-site start --ca ca.crt\`); sites check its SHA-256 fingerprint, printed
                       below, with the operator by phone or another channel.
  OUT_DIR/server.key   the coordinator's TLS private key (0600).
  OUT_DIR/server.crt   the coordinator's TLS certificate (valid --days, default $SERVER_DAYS), signed by
                       the CA, with every HOST as a subjectAltName (DNS name or IP address). Name every
                       host name and address the sites use to reach the coordinator;
                       ${LOOPBACK_NAMES[*]} are always added. Without HOST: loopback only (a test on one machine).
  It refuses to run when OUT_DIR already holds a CA: re-running must never replace a CA that sites trust.

--renew-server: a new coordinator key and certificate signed by the existing CA in OUT_DIR (expiry,
  new host names, or a leaked server key). Sites need no change. The previous server.key and server.crt
  are kept as server.key.<UTC time> and server.crt.<UTC time>. Restart the coordinator afterwards.

--site-key: a SuperNode authentication key pair for one site (run at the site; the private key never
  leaves it). Writes OUT_DIR/NAME.key (0600, OpenSSH ECDSA P-384, what Flower's SuperNode reads) and
  OUT_DIR/NAME.pub (send this PUBLIC key to the operator, who enrolls it). NAME defaults to "site".
  \`neurofed-site keygen --out DIR\` makes the same kind of key pair without ssh-keygen.

Options:
  --days N       validity of the coordinator certificate in days (default $SERVER_DAYS)
  --ca-days N    validity of the CA certificate in days (default $CA_DAYS)
  --ca-name NAME the CA's common name (default "neurofed coordinator CA")
  -h, --help     show this help

Examples:
  $PROG /etc/neurofed/certs coordinator.example.org 203.0.113.7
  $PROG --renew-server /etc/neurofed/certs coordinator.example.org 203.0.113.7
  $PROG --site-key /etc/neurofed-site/keys hospital-a
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

require_positive_int() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive number of days, got '$2'"
}

mode=ca
ca_name="neurofed coordinator CA"
while (($#)); do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --renew-server) mode=renew ;;
        --site-key) mode=site ;;
        --days)
            (($# >= 2)) || die "--days needs a value"
            require_positive_int --days "$2"
            SERVER_DAYS=$2
            shift
            ;;
        --ca-days)
            (($# >= 2)) || die "--ca-days needs a value"
            require_positive_int --ca-days "$2"
            CA_DAYS=$2
            shift
            ;;
        --ca-name)
            (($# >= 2)) || die "--ca-name needs a value"
            ca_name=$2
            shift
            ;;
        --)
            shift
            break
            ;;
        -*) die "unknown option $1 (see $PROG --help)" ;;
        *) break ;;
    esac
    shift
done
(($# >= 1)) || die "missing OUT_DIR (see $PROG --help)"
out_dir=$1
shift

# subjectAltName list for the coordinator certificate: IP:... for addresses, DNS:... for names.
subject_alt_names() {
    local -a entries=()
    local seen=" " host
    for host in "$@" "${LOOPBACK_NAMES[@]}"; do
        [[ $seen == *" $host "* ]] && continue
        seen+="$host "
        if [[ $host =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $host == *:* ]]; then
            entries+=("IP:$host")
        elif [[ $host =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
            entries+=("DNS:$host")
        else
            die "'$host' is neither a host name nor an IP address: name the coordinator's hosts as e.g. coordinator.example.org or 203.0.113.7"
        fi
    done
    local IFS=,
    echo "${entries[*]}"
}

# Writes $work/server.key and $work/server.crt for subjectAltName list $3 and common name $4, signed by the
# CA given as key and certificate paths.
make_server_certificate() {
    local ca_key=$1 ca_crt=$2 sans=$3 common_name=$4
    openssl genpkey -quiet -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$work/server.key"
    openssl req -new -key "$work/server.key" -subj "/CN=$common_name" -out "$work/server.csr"
    cat >"$work/server.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = $sans
EOF
    openssl x509 -req -in "$work/server.csr" -CA "$ca_crt" -CAkey "$ca_key" -CAcreateserial \
        -CAserial "$work/ca.srl" -days "$SERVER_DAYS" -sha384 -extfile "$work/server.ext" \
        -out "$work/server.crt" 2>/dev/null
    openssl verify -CAfile "$ca_crt" "$work/server.crt" >/dev/null ||
        die "the new coordinator certificate does not verify against $ca_crt; nothing was changed"
    chmod 0644 "$work/server.crt"
    echo "coordinator certificate names: $sans"
}

print_ca_fingerprint() {
    echo "CA certificate $1"
    echo "  $(openssl x509 -in "$1" -noout -fingerprint -sha256)"
    echo "  sites compare this fingerprint with the operator before trusting the file"
}

# Host names are checked before anything is made.
if [[ $mode != site ]]; then
    sans=$(subject_alt_names "$@")
    common_name=${1:-localhost}
fi
mkdir -p -- "$out_dir"
[[ -w $out_dir ]] || die "cannot write to $out_dir: choose a folder you own or run as its owner"
# Keys are created readable by their owner only, before any byte of them is written.
umask 077
work=$(mktemp -d "$out_dir/.make-certs.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

case $mode in
    ca)
        for existing in ca.key ca.crt server.key server.crt; do
            [[ -e $out_dir/$existing ]] &&
                die "$out_dir/$existing already exists; refusing to replace a CA that sites may trust. To renew only the coordinator certificate run: $PROG --renew-server $out_dir HOST ...; to start over, move $out_dir away first"
        done
        openssl genpkey -quiet -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$work/ca.key"
        openssl req -new -x509 -key "$work/ca.key" -days "$CA_DAYS" -sha384 -subj "/CN=$ca_name" \
            -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -addext "subjectKeyIdentifier=hash" -out "$work/ca.crt"
        chmod 0644 "$work/ca.crt"
        make_server_certificate "$work/ca.key" "$work/ca.crt" "$sans" "$common_name"
        # The CA first: were the server files' move to fail, a re-run refuses and --renew-server completes it.
        mv -- "$work/ca.key" "$work/ca.crt" "$out_dir/"
        mv -- "$work/server.key" "$work/server.crt" "$out_dir/"
        echo "wrote $out_dir/ca.key (keep private), $out_dir/ca.crt, $out_dir/server.key, $out_dir/server.crt"
        print_ca_fingerprint "$out_dir/ca.crt"
        ;;
    renew)
        for needed in ca.key ca.crt; do
            [[ -f $out_dir/$needed ]] ||
                die "$out_dir/$needed not found: --renew-server signs with the existing CA; run $PROG $out_dir HOST ... first (or point OUT_DIR at the folder that holds ca.key and ca.crt)"
        done
        make_server_certificate "$out_dir/ca.key" "$out_dir/ca.crt" "$sans" "$common_name"
        stamp=$(date -u +%Y%m%dT%H%M%SZ)
        for name in server.key server.crt; do
            if [[ -e $out_dir/$name ]]; then
                mv -- "$out_dir/$name" "$out_dir/$name.$stamp"
            fi
        done
        mv -- "$work/server.key" "$work/server.crt" "$out_dir/"
        echo "wrote $out_dir/server.key and $out_dir/server.crt (previous ones kept with suffix .$stamp)"
        echo "restart the coordinator to use them (systemctl restart neurofed-coordinator)"
        print_ca_fingerprint "$out_dir/ca.crt"
        ;;
    site)
        (($# <= 1)) || die "--site-key takes OUT_DIR and at most one NAME, got: $*"
        name=${1:-site}
        [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
            die "site key name '$name' may hold only letters, digits, '.', '_' and '-'"
        command -v ssh-keygen >/dev/null ||
            die "ssh-keygen not found: install OpenSSH's client tools, or run \`neurofed-site keygen --out $out_dir\`"
        for existing in "$name.key" "$name.pub"; do
            [[ -e $out_dir/$existing ]] &&
                die "$out_dir/$existing already exists; refusing to replace a site key the coordinator may have enrolled. Choose another NAME or folder"
        done
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "neurofed-site $name" -f "$work/$name.key"
        chmod 0644 "$work/$name.key.pub"
        mv -- "$work/$name.key" "$out_dir/$name.key"
        mv -- "$work/$name.key.pub" "$out_dir/$name.pub"
        echo "wrote $out_dir/$name.key (private: stays at this site) and $out_dir/$name.pub"
        echo "send $out_dir/$name.pub to the coordinator's operator, who runs: neurofed coordinator enroll $name.pub --name $name"
        ;;
esac
