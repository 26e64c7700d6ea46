// The one way the browser tests start Debian's chromium (playwright-core, no downloaded
// browser): headless, a throw-away profile, no background traffic. `CHROMIUM` overrides the
// executable.
import { chromium } from 'playwright-core';

/** A persistent context on `profile` (a fresh directory), with `extraArgs` appended. */
export function launchChromium(profile, extraArgs = []) {
  return chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      ...extraArgs,
    ],
  });
}
