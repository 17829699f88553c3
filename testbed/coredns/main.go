// CoreDNS with only the plugins a test cluster's DNS uses: the kubernetes plugin for Service
// and pod names, plus health, readiness, caching and errors. CoreDNS's own main links every
// plugin, and with them the AWS, Azure and Google Cloud SDKs (route53, azure, clouddns),
// which would triple the cold build for nothing a test uses. This is CoreDNS's documented way
// to choose plugins outside the source tree: set dnsserver.Directives, import the plugins, and
// call coremain.Run.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// In the order of CoreDNS's own core/dnsserver/zdirectives.go, which decides the order in
// which the plugins see a query.
var directives = []string{"bind", "ready", "health", "errors", "log", "cache", "kubernetes"}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
