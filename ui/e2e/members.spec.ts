import { expect, expectAccessible, screenshot, signIn, test } from "./fixtures";
import { INVITATION_LINK, linkMailedTo } from "./mail";

test("members: an admin invites a person by email, the link makes them a member who signs in", async ({ page, browser }) => {
  const tag = Date.now().toString(36);
  const invitee = { user: `e2e-${tag}`, email: `e2e-${tag}@example.com`, password: `Lantern-Orchard-${tag}-Pebble` };

  await signIn(page);
  await page.getByRole("button", { name: "Members" }).click();
  await expect(page).toHaveURL(/\/members$/);
  await expect(page.getByTestId("member-row").first()).toBeVisible();
  await expectAccessible(page);

  // The form says what is wrong before any call.
  await page.getByLabel("Email").fill("not an address");
  await page.getByRole("button", { name: "Invite" }).click();
  await expect(page.getByRole("alert")).toContainText("name@example.com");
  await expectAccessible(page); // with the field marked invalid

  const invitedAt = Date.now();
  await page.getByLabel("Email").fill(invitee.email);
  await page.getByLabel("Role", { exact: true }).selectOption("operator");
  await page.getByRole("button", { name: "Invite" }).click();
  await expect(page.getByRole("status")).toHaveText(`Invitation sent to ${invitee.email}.`);
  const pending = page.getByTestId("invitation-row").filter({ hasText: invitee.email });
  await expect(pending).toContainText("operator");
  await expect(page.getByTestId("audit-row").filter({ hasText: invitee.email }).first()).toContainText("Invitation sent");
  await expectAccessible(page);
  await screenshot(page, "members-01-invited");

  // The invitation email reaches the dev mail sink with the single-use link.
  const link = await linkMailedTo(invitee.email, INVITATION_LINK, invitedAt);

  // The invitee, in a browser of their own, creates the account from the link.
  const theirs = await browser.newContext({ baseURL: test.info().project.use.baseURL });
  const them = await theirs.newPage();
  await them.goto(link);
  await expect(them.getByText(invitee.email)).toBeVisible();
  await expectAccessible(them);
  await them.getByLabel("User name").fill(invitee.user);
  await them.getByLabel("New password", { exact: true }).fill(invitee.password);
  await them.getByLabel("Repeat the new password").fill(invitee.password);
  await them.getByRole("button", { name: "Create the account and join" }).click();
  await expect(them.getByRole("status")).toContainText("as operator");
  await expect(them).toHaveURL(/\/invitations\/accept$/); // the token left the address bar

  // The link worked once.
  await them.goto(link);
  await expect(them.getByRole("heading", { name: "This invitation was already accepted" })).toBeVisible();

  // They sign in with the new password and are a member: not an admin, so no Members screen.
  await signIn(them, invitee);
  await expect(them.getByRole("button", { name: "Tasks" })).toBeVisible();
  await expect(them.getByRole("button", { name: "Members" })).toHaveCount(0);

  // The admin sees the new member with the invited role; the invitation is no longer pending.
  await page.reload();
  const member = page.getByTestId("member-row").filter({ hasText: invitee.email });
  await expect(member).toBeVisible();
  await expect(member.getByRole("combobox")).toHaveValue("operator");
  await expect(page.getByTestId("invitation-row").filter({ hasText: invitee.email })).toHaveCount(0);
  await expect(page.getByTestId("audit-row").filter({ hasText: "Invitation accepted" }).first()).toBeVisible();

  // Removing takes a confirmation; the member is then gone.
  await member.getByRole("button", { name: `Remove ${invitee.email}` }).click();
  await expectAccessible(page);
  await member.getByRole("button", { name: "Yes, remove" }).click();
  await expect(page.getByRole("status")).toContainText("was removed from the organization");
  await expect(page.getByTestId("member-row").filter({ hasText: invitee.email })).toHaveCount(0);
  await screenshot(page, "members-02-removed");

  // The removal ends their session now, not when their access token expires: the next call is
  // refused and so is the refresh.
  await them.getByRole("button", { name: "Tasks" }).click();
  await expect(them.getByRole("alert")).toContainText("Signed out");
  await expect(them.getByRole("button", { name: "Sign in" })).toBeVisible();
  await theirs.close();
});
