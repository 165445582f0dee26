// Drives Debian's Chromium for bench/ui_stream_bench.py: records, in the page, when each token
// of an answer is in the DOM (MutationObserver) and when it is painted (the next animation
// frame), as wall-clock milliseconds. Prints one JSON object: {ours: {dom, paint}, floor: {...}}.
import { chromium } from "@playwright/test";

const { OURS_URL, FLOOR_URL, USER, PASSWORD, CHROMIUM, TOKENS } = process.env;
const tokens = Number(TOKENS);

// Runs in the page: counts tokens ("w<number>") in the last element matching `selector`.
function observe(selector) {
  window.__dom = [];
  window.__paint = [];
  const now = () => performance.timeOrigin + performance.now();
  new MutationObserver(() => {
    const all = document.querySelectorAll(selector);
    const last = all[all.length - 1];
    if (!last) return;
    const count = (last.textContent.match(/w\d+/g) || []).length;
    const at = now();
    const first = window.__dom.length;
    while (window.__dom.length < count) window.__dom.push(at);
    if (count > first) {
      requestAnimationFrame(() => {
        const painted = now();
        while (window.__paint.length < count) window.__paint.push(painted);
      });
    }
  }).observe(document.body, { subtree: true, childList: true, characterData: true });
}

async function collect(page) {
  await page.waitForFunction((n) => window.__paint.length >= n, tokens, { timeout: 120_000 });
  return page.evaluate(() => ({ dom: window.__dom, paint: window.__paint }));
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  await page.goto(OURS_URL);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByLabel("User").fill(USER);
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("button", { name: "New chat" }).click();
  await page.getByLabel("Message").fill("stream the benchmark answer");
  await page.evaluate(observe, '[data-testid="answer-text"]');
  await page.getByRole("button", { name: "Send" }).click();
  const ours = await collect(page);

  const floor = await browser.newPage();
  await floor.goto(FLOOR_URL);
  await floor.evaluate(observe, "#answer");
  await floor.getByRole("button", { name: "Start" }).click();
  const direct = await collect(floor);
  console.log(JSON.stringify({ ours, floor: direct }));
} finally {
  await browser.close();
}
