// Package templates embeds the ruleset templates that the render package
// executes. The .tmpl files beside this file are the single source of the
// rules the sidecar installs; go:embed cannot reach a parent folder, so this
// tiny package is what lets them live at the top of the repository.
package templates

import "embed"

// FS holds every *.tmpl file of this folder.
//
//go:embed *.tmpl
var FS embed.FS

// Ruleset is the name of the template that renders the iptables-restore
// payload for one address family.
const Ruleset = "ruleset.tmpl"
