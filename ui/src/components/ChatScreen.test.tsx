import { create } from "@bufbuild/protobuf";
import { createRouterTransport } from "@connectrpc/connect";
import { render, screen, waitFor } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { describe, expect, it, vi } from "vitest";
import { ChatService } from "@gen/opsmesh/chat/v1/chat_pb.js";
import { SessionSchema, SessionService } from "@gen/opsmesh/session/v1/session_pb.js";
import { createApi } from "../api/transport";
import { deferred } from "../test/deferred";
import { ChatScreen } from "./ChatScreen";

describe("ChatScreen", () => {
  it("makes one chat per click and hands the keyboard to its message box", async () => {
    const answered = deferred();
    let created = 0;
    const transport = createRouterTransport((router) => {
      router.service(SessionService, {
        listSessions: () => ({ sessions: [create(SessionSchema, { id: "old", title: "Older chat" })] }),
        async createSession() {
          created += 1;
          await answered.promise;
          return { session: create(SessionSchema, { id: "new", title: "New one" }) };
        },
      });
      router.service(ChatService, {
        getHistory: () => ({ messages: [] }),
        listModels: () => ({ models: [] }),
      });
    });
    render(<ChatScreen api={createApi(transport)} auth={{ refresh: async () => {} }} onError={vi.fn()} />);
    await screen.findByRole("button", { name: "Older chat", current: true });
    expect(document.activeElement).not.toBe(screen.getByLabelText("Message"));

    const user = userEvent.setup();
    const newChat = screen.getByRole<HTMLButtonElement>("button", { name: "New chat" });
    await user.click(newChat);
    expect(newChat.disabled).toBe(true);
    await user.click(newChat);
    answered.resolve();

    await screen.findByRole("button", { name: "New one", current: true });
    await waitFor(() => expect(document.activeElement).toBe(screen.getByLabelText("Message")));
    expect(newChat.disabled).toBe(false);
    expect(created).toBe(1);
  });
});
