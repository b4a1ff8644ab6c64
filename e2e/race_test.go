//go:build race

package e2e

// raceEnabled reports whether the test binary was built with the race
// detector: buildSidecar then builds the sidecar with it too.
const raceEnabled = true
