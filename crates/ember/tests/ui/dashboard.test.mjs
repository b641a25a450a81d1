// The dashboard in headless Chromium, run by observe_cli.rs against a live
// `ember up`: Debian's /usr/bin/chromium driven by playwright-core (from
// scripts/install-playwright.sh; it never downloads a browser).
//
// Environment: EMBER_URL, EMBER_TOKEN (client token), EMBER_IMAGE (a pinned
// image as JSON, for the run this script submits), EMBER_RUNS (ids of runs
// already there, comma-separated), EMBER_LOG_RUN and EMBER_LOG_TEXT (a run
// and a line of its output), SCREENSHOT (where to save the page),
// EMBER_PLAYWRIGHT (playwright-core's prefix).
import { createRequire } from 'node:module';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const env = process.env;
const prefix = env.EMBER_PLAYWRIGHT || '/opt/ember-playwright';
const require = createRequire(join(prefix, 'node_modules', 'x.js'));
const { chromium } = require('playwright-core');

const TIMEOUT = 60_000;
const step = (msg) => console.log(`dashboard: ${msg}`);

const userDataDir = mkdtempSync(join(tmpdir(), 'ember-chromium-'));
let context;
try {
  // launchPersistentContext passes the fresh profile as --user-data-dir.
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    viewport: { width: 1400, height: 1100 },
    timeout: TIMEOUT,
  });
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(TIMEOUT);
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  let loads = 0;
  page.on('load', () => { loads += 1; });

  // The token goes in the fragment, which never reaches the server; the
  // page moves it to sessionStorage.
  await page.goto(`${env.EMBER_URL}/ui#token=${encodeURIComponent(env.EMBER_TOKEN)}`);
  for (const id of env.EMBER_RUNS.split(',')) {
    await page.waitForSelector(`#runs tbody tr[data-run="${id}"][data-state="succeeded"]`);
  }
  step(`runs listed: ${env.EMBER_RUNS}`);
  // Each started run's start-time breakdown is a bar of phases.
  const segments = await page.locator(`#runs tbody tr[data-run] .bar span`).count();
  if (segments < 1) throw new Error('no start-time bar segments');

  await page.waitForFunction(() => {
    const h = document.querySelector('#histograms .histogram[data-phase="total"]');
    return h && Number(h.dataset.count) >= 1 && h.querySelectorAll('.bars div').length >= 13;
  });
  step('histogram of total start time shown');
  await page.waitForSelector('#latency circle[data-run]');
  await page.waitForSelector('#nodes tbody tr[data-node="node-0"]');
  step('node-0 listed');
  await page.waitForFunction(() => /hit ratio \d/.test(document.querySelector('#cache')?.textContent || ''));
  step('cache hit ratio shown');
  if (await page.evaluate(() => location.hash) !== '') throw new Error('the token stayed in the URL');

  // A run submitted now appears without a reload.
  await page.evaluate(() => { window.__sameDocument = true; });
  const resp = await fetch(`${env.EMBER_URL}/v1/runs`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${env.EMBER_TOKEN}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ image: JSON.parse(env.EMBER_IMAGE), command: ['echo', 'live'] }),
  });
  if (!resp.ok) throw new Error(`submit: ${resp.status} ${await resp.text()}`);
  const { run } = await resp.json();
  const fresh = `run-${run.id}`;
  await page.waitForSelector(`#runs tbody tr[data-run="${fresh}"]`);
  if (!(await page.evaluate(() => window.__sameDocument === true)) || loads !== 1) {
    throw new Error(`the page reloaded (loads: ${loads})`);
  }
  step(`${fresh} appeared without a reload`);
  await page.waitForSelector(`#runs tbody tr[data-run="${fresh}"][data-state="succeeded"]`);

  // The state filter: no run failed, so none is listed; then all again.
  await page.selectOption('#filter-state', 'failed');
  await page.waitForFunction(() => document.querySelectorAll('#runs tbody tr[data-run]').length === 0);
  await page.selectOption('#filter-state', '');
  await page.waitForSelector(`#runs tbody tr[data-run="${fresh}"]`);
  step('the state filter works');

  // A run's logs, on a click.
  await page.click(`#runs tbody tr[data-run="${env.EMBER_LOG_RUN}"]`);
  await page.waitForFunction((text) =>
    (document.querySelector('#logs')?.textContent || '').includes(text), env.EMBER_LOG_TEXT);
  step(`logs of ${env.EMBER_LOG_RUN} shown`);

  if (errors.length) throw new Error(`errors in the page: ${errors.join('; ')}`);
  await page.screenshot({ path: env.SCREENSHOT, fullPage: true });
  step(`screenshot in ${env.SCREENSHOT}`);
} finally {
  if (context) await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
