-- requeue.lua: hand a gone member's unhandled queue group deliveries to other members, once.
--
-- KEYS[1] the gone peer's inbox   KEYS[2] members zset   KEYS[3..] inboxes of the new members
-- ARGV[1] the peers' consumer group   ARGV[2] inbox MAXLEN
-- then triples (inbox entry id, index i of the new member's inbox KEYS[2 + i], new member's id)
-- An entry moves only if it is still unhandled (pending, or never read: after the group's last
-- delivered id) and its new member is still a member; it is copied into the new inbox and deleted
-- from the old one in the same step, so a second run finds nothing to move. An entry without a
-- 'ts' field (the direct path stamps none: its id is its time) gets one from its old id.
-- Returns the number of entries moved
local function newer(a, b)  -- stream id a > b
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local last = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
  end
end
local moved = 0
for p = 3, #ARGV, 3 do
  local id, target, peer = ARGV[p], KEYS[2 + tonumber(ARGV[p + 1])], ARGV[p + 2]
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found == 1 and redis.call('ZSCORE', KEYS[2], peer) then
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    if #pending == 1 or newer(id, last) then
      local fields = found[1][2]
      local stamped = false
      for f = 1, #fields, 2 do
        if fields[f] == 'ts' then stamped = true end
      end
      if not stamped then  -- a direct-path entry's time is its id: keep it across the move
        fields[#fields + 1] = 'ts'
        fields[#fields + 1] = string.match(id, '^(%d+)')
      end
      redis.call('XADD', target, 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
      redis.call('XDEL', KEYS[1], id)
      moved = moved + 1
    end
  end
end
return moved
