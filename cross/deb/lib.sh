# Shared by cross/package (vantage-agent) and cross/package-ingester: Depends from a binary, the
# copyright file. Sourced, not run.

# Depends: from the dynamic section (none for the static musl build) and the newest glibc
# symbol version the binary uses.
depends() {
    local bin=$1 needed glibc list=()
    needed=$(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')
    [[ -n $needed ]] || return 0
    glibc=$(readelf -V "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
    while read -r lib; do
        case $lib in
        libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | ld-linux*)
            list+=("libc6 (>= $glibc)") ;;
        libgcc_s.so.*) list+=("libgcc-s1") ;;
        libssl.so.3 | libcrypto.so.3) list+=("libssl3") ;;
        libz.so.1) list+=("zlib1g") ;;
        *) echo "cross/deb: $bin needs $lib, which has no Depends mapping" >&2; exit 1 ;;
        esac
    done <<<"$needed"
    printf '%s\n' "${list[@]}" | sort -u | paste -sd, | sed 's/,/, /g'
}

# The Debian copyright file of both packages, into $1.
write_copyright() {
    cat >"$1" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vantage
Source: https://example.invalid/vantage

Files: *
Copyright: the vantage authors
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF
}
