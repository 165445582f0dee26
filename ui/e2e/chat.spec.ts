import { expect, newChat, screenshot, signIn, test } from "./fixtures";

test.describe.configure({ mode: "serial" });

test("sign in, stream, stop, history, sign out; the old refresh token is dead", async ({
  page,
  consoleErrors,
}) => {
  await signIn(page);
  await screenshot(page, "01-signed-in");

  await newChat(page);
  const message = page.getByLabel("Message");
  await message.fill("Which alerts fire right now?");
  await message.press("Enter");

  const answer = page.getByTestId("answer").last();
  const text = page.getByTestId("answer-text").last();
  await expect(text).toContainText("t3"); // tokens stream in one by one
  await expect(answer).toHaveAttribute("data-status", "streaming");
  await screenshot(page, "02-streaming");
  await page.getByRole("button", { name: "Stop" }).click();
  await expect(answer).toHaveAttribute("data-status", "stopped");
  const stoppedAt = await text.innerText();
  expect(stoppedAt).not.toContain("t99"); // stopped well before the end
  await page.waitForTimeout(300);
  expect(await text.innerText()).toBe(stoppedAt); // nothing arrives after Stop
  await expect(page.getByRole("button", { name: "Send" })).toBeVisible();

  // A reload keeps the sign-in (refresh token in sessionStorage) and shows the stored history.
  await page.reload();
  await expect(page.getByTestId("identity")).toContainText("dev");
  const history = page.getByTestId("history-message");
  await expect(history.first()).toContainText("Which alerts fire right now?");
  await expect(history.nth(1)).toContainText("(stopped before the end)");
  await screenshot(page, "03-history");

  // Sign out revokes the family: the refresh token the tab held no longer works.
  const spent = await page.evaluate(() => sessionStorage.getItem("opsmesh.auth.refresh"));
  expect(spent).toBeTruthy();
  await page.getByRole("button", { name: "Sign out" }).click();
  await expect(page.getByRole("button", { name: "Sign in" })).toBeVisible();
  expect(await page.evaluate(() => sessionStorage.getItem("opsmesh.auth.refresh"))).toBeNull();
  const refresh = await page.request.post("/oauth/token", {
    form: { grant_type: "refresh_token", refresh_token: spent ?? "", client_id: "opsmesh-web" },
  });
  expect(refresh.status()).toBe(400);
  expect((await refresh.json()).error).toBe("invalid_grant");
  expect(consoleErrors).toEqual([]);
});

test("a whole answer streams to the end and is kept", async ({ page }) => {
  await signIn(page);
  await newChat(page);
  await page.getByLabel("Message").fill("Summarize the last deploy");
  await page.getByRole("button", { name: "Send" }).click();
  const answer = page.getByTestId("answer").last();
  await expect(answer).toHaveAttribute("data-status", "done", { timeout: 30_000 });
  const full = await page.getByTestId("answer-text").last().innerText();
  expect(full.trim().split(/\s+/).length).toBeGreaterThan(20);
  await page.reload();
  await expect(page.getByTestId("history-message").nth(1)).toHaveText(new RegExp(full.trim().slice(-12)));
});

test("the API refuses calls without a token, through the same edge", async ({ request }) => {
  const response = await request.post("/opsmesh.session.v1.SessionService/ListSessions", {
    headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
    data: Buffer.from([0, 0, 0, 0, 0]),
  });
  expect(response.status()).toBe(401);
});
