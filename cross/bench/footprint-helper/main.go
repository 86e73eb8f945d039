// footprint-helper is the local half of `make bench-footprint` (cross/bench-footprint): the HTTP
// targets both probers check, and the scraper that makes blackbox_exporter probe them at the
// same rate as the agent does. Only 127.0.0.1 is ever contacted. Standard library only.
//
//	footprint-helper serve ADDR
//	    Every path answers 200 with a small HTML body that contains "target: ok".
//	footprint-helper serve-tls ADDR CA_PEM
//	    The same over TLS: a fresh CA and an ECDSA P-256 leaf for 127.0.0.1 signed by it; the
//	    CA's PEM is written to CA_PEM (the agent's ca_file).
//	footprint-helper scrape -blackbox URL -base URL -targets N -interval 10s -duration 100s
//	    Asks blackbox_exporter (module http_2xx) to probe BASE/t/0 .. BASE/t/N-1, each once per
//	    interval, spread evenly over the interval, the way Prometheus scrapes it; then prints
//	    "scrapes=S ok=O failed=F".
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const body = "<html><body>vantage test target: ok</body></html>\n"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: footprint-helper serve ADDR | scrape [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2])
	case "serve-tls":
		serveTLS(os.Args[2], os.Args[3])
	case "scrape":
		scrape(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(2)
	}
}

func handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		io.WriteString(w, body)
	})
}

func serve(addr string) {
	fail(http.ListenAndServe(addr, handler()))
}

func serveTLS(addr, caPath string) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	fail(err)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "footprint-helper CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	fail(err)
	ca, err := x509.ParseCertificate(caDER)
	fail(err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	fail(err)
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &key.PublicKey, caKey)
	fail(err)
	fail(os.WriteFile(caPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644))
	srv := &http.Server{
		Addr:    addr,
		Handler: handler(),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{
			{Certificate: [][]byte{leafDER, caDER}, PrivateKey: key},
		}},
	}
	fail(srv.ListenAndServeTLS("", ""))
}

func fail(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func scrape(args []string) {
	fs := flag.NewFlagSet("scrape", flag.ExitOnError)
	blackbox := fs.String("blackbox", "http://127.0.0.1:9115", "blackbox_exporter base URL")
	base := fs.String("base", "http://127.0.0.1:18190", "base URL of the targets")
	targets := fs.Int("targets", 10, "number of targets")
	interval := fs.Duration("interval", 10*time.Second, "probe interval per target")
	duration := fs.Duration("duration", 100*time.Second, "how long to run")
	fs.Parse(args)

	client := &http.Client{
		Timeout:   15 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: 256, MaxConnsPerHost: 0},
	}
	ctx, cancel := context.WithTimeout(context.Background(), *duration)
	defer cancel()
	var scrapes, ok, failed atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < *targets; i++ {
		target := fmt.Sprintf("%s/t/%d", *base, i)
		probeURL := fmt.Sprintf("%s/probe?module=http_2xx&target=%s", *blackbox, url.QueryEscape(target))
		offset := time.Duration(int64(*interval) * int64(i) / int64(*targets))
		wg.Add(1)
		go func() {
			defer wg.Done()
			next := time.Now().Add(offset)
			for {
				select {
				case <-ctx.Done():
					return
				case <-time.After(time.Until(next)):
				}
				next = next.Add(*interval)
				scrapes.Add(1)
				resp, err := client.Get(probeURL)
				if err != nil {
					failed.Add(1)
					continue
				}
				metrics, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if strings.Contains(string(metrics), "\nprobe_success 1\n") {
					ok.Add(1)
				} else {
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	fmt.Printf("scrapes=%d ok=%d failed=%d\n", scrapes.Load(), ok.Load(), failed.Load())
}
