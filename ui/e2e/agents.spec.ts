import type { Locator, Page } from "@playwright/test";
import { expect, expectAccessible, newChat, screenshot, signIn, test } from "./fixtures";

// The agents' scenarios: tool cards, a chart, an approval, against the stack's real Prometheus,
// Alertmanager and task service (the model server replays a tool-calling model's calls).
test.describe.configure({ mode: "serial" });

/** Answers with tool calls take longer than plain ones. */
const ANSWER_TIMEOUT = 90_000;


async function ask(page: Page, agent: string, question: string): Promise<Locator> {
  await page.getByRole("combobox", { name: "Agent" }).selectOption({ label: agent });
  const message = page.getByLabel("Message");
  await message.fill(question);
  await message.press("Enter");
  return page.getByTestId("answer").last();
}

test("the monitoring agent answers with tool cards and a chart, and a reload shows them again", async ({
  page,
}) => {
  test.setTimeout(180_000);
  await signIn(page);
  await newChat(page);
  const answer = await ask(page, "Monitoring", "which alerts are firing?");
  await expect(answer).toHaveAttribute("data-status", "done", { timeout: ANSWER_TIMEOUT });
  await expect(answer.getByRole("heading", { name: /^Assistant · Monitoring/ })).toBeVisible();

  const alerts = answer.getByRole("region", { name: "Tool call list_alerts" });
  await expect(alerts).toBeVisible();
  await expect(alerts).toHaveAttribute("data-status", "done");
  await expect(alerts.getByTestId("tool-status")).toHaveText("done");

  const range = answer.getByRole("region", { name: "Tool call prometheus_query_range" });
  await expect(range).toHaveAttribute("data-status", "done");
  await expect(range.getByText(/^\d+\.\d+ s$/)).toBeVisible(); // the tool's run time
  const chart = range.getByRole("img", { name: /^Time series chart/ });
  await expect(chart).toBeVisible();
  await expect(chart.locator("canvas").first()).toBeVisible(); // uPlot drew it (not the placeholder)
  await range.getByRole("button", { name: "Show data" }).click();
  await expect(range.getByRole("table", { name: /^Data points of / })).toBeVisible();

  const text = answer.getByTestId("answer-text");
  await expect(text).not.toBeEmpty();
  const answered = (await text.innerText()).trim();
  await screenshot(page, "agents-01-monitoring");
  await expectAccessible(page);

  // A narrow screen: the chart shrinks with its container, the page does not scroll sideways.
  await page.setViewportSize({ width: 375, height: 800 });
  await expect
    .poll(async () => (await chart.boundingBox())?.width ?? 0)
    .toBeLessThanOrEqual(375);
  expect(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth)).toBe(true);
  await screenshot(page, "agents-02-monitoring-narrow");
  await page.setViewportSize({ width: 1280, height: 720 });

  // After a reload the stored answer has the same cards and chart, before its text.
  await page.reload();
  const stored = page.getByTestId("history-message").last();
  await expect(stored.getByRole("region", { name: "Tool call list_alerts" })).toHaveAttribute("data-status", "done");
  const storedRange = stored.getByRole("region", { name: "Tool call prometheus_query_range" });
  await expect(storedRange.getByRole("img", { name: /^Time series chart/ }).locator("canvas").first()).toBeVisible();
  await expect(stored).toContainText(answered.slice(-12));
});

test("the operations agent asks before it changes something; Approve runs the tool", async ({ page }) => {
  test.setTimeout(180_000);
  await signIn(page);
  await newChat(page);
  const answer = await ask(page, "Operations", "provision a workspace for team X");

  // The card that asks: found by its Approve button, then held by its name (the button goes away).
  const asking = answer
    .getByRole("region", { name: /^Tool call / })
    .filter({ has: page.getByRole("button", { name: "Approve" }) });
  await expect(asking).toBeVisible({ timeout: ANSWER_TIMEOUT });
  const name = await asking.getAttribute("aria-label");
  const card = answer.getByRole("region", { name: name ?? "", exact: true });
  await expect(card).toHaveAttribute("data-status", "awaiting-approval");
  await expect(card.getByRole("group", { name: /^Approval for / })).toBeVisible();
  await expect(card.getByRole("timer")).toHaveText(/^\d+:\d\d$/);
  await expect(card.getByText("Arguments")).toBeVisible();
  await expect(answer).toHaveAttribute("data-status", "streaming"); // the generation waits
  await screenshot(page, "agents-03-approval");
  await expectAccessible(page);

  await card.getByRole("button", { name: "Approve" }).click();
  await expect(card.getByRole("status")).toHaveText("Approved");
  await expect(card).toHaveAttribute("data-status", "done", { timeout: ANSWER_TIMEOUT });
  await expect(card.getByText("Result", { exact: true })).toBeVisible();
  await expect(card.getByRole("button", { name: "Approve" })).toHaveCount(0);
  await expect(answer).toHaveAttribute("data-status", "done", { timeout: ANSWER_TIMEOUT });
  await expect(answer.getByTestId("answer-text")).not.toBeEmpty();
  await screenshot(page, "agents-04-approved");

  // The stored answer keeps the decision, without buttons.
  await page.reload();
  const stored = page.getByTestId("history-message").last();
  const storedCard = stored.getByRole("region", { name: name ?? "", exact: true });
  await expect(storedCard.getByRole("status")).toHaveText("Approved");
  await expect(storedCard).toHaveAttribute("data-status", "done");
  await expect(stored.getByRole("button", { name: "Approve" })).toHaveCount(0);
});
