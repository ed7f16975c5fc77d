// Takes docs/demo.png: the demo chat in headless chromium with the chat bot (examples/chat_bot.rs) running.
// Run after scripts/browser-tests has installed things: cargo build --bin roomwire --example chat_bot &&
//   node tests/browser/screenshot.mjs
import { spawn } from "node:child_process";
import path from "node:path";
import { Stack, launchBrowser, until } from "./harness.mjs";

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../..");
const stack = await Stack.start();
const bot = spawn(path.join(root, "target/debug/examples/chat_bot"), [`nats://127.0.0.1:${stack.natsPort}`], {
  stdio: "ignore",
});
const browser = await launchBrowser(stack);
try {
  await new Promise((r) => setTimeout(r, 500)); // the bot subscribes
  const open = async (name) => {
    const ctx = await browser.newContext({ viewport: { width: 1000, height: 620 } });
    const page = await ctx.newPage();
    await page.goto(`${stack.origin}/?name=${name}&room=lobby`);
    await page.waitForFunction(() => window.roomwireDemo?.rw.rooms().includes("lobby"));
    return page;
  };
  const say = async (page, text) => {
    await page.fill("#text", text);
    await page.press("#text", "Enter");
    await page.waitForTimeout(250);
  };
  const alice = await open("alice");
  const bob = await open("bob");
  await open("carol"); // stays: the member list shows her
  await say(bob, "hi alice! is this going over NATS?");
  await say(alice, "yes: browser → gateway → NATS → your tab");
  await say(bob, "!time");
  await say(alice, "!echo a bot on async-nats answered that");
  await alice.fill("#room", "design");
  await alice.press("#room", "Enter");
  await alice.waitForTimeout(300);
  await alice.click("#rooms li:first-child");
  await bob.close();
  await until(async () => (await alice.$$("#log li.event")).length >= 3, "bob's leave relayed");
  await until(async () => (await alice.$$("#members li")).length === 2, "bob gone from the member list");
  await alice.fill("#text", "see you tomorrow");
  await alice.screenshot({ path: path.join(root, "docs/demo.png") });
  console.log("wrote docs/demo.png");
} finally {
  await browser.close();
  bot.kill();
  await stack.stop();
}
