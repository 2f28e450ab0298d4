# Turns the Lua sources (lua/*.lua) into ratekeeper/redis/lua_scripts.hpp:
# one raw string per script, each the concatenation of its parts, so a part
# two scripts share (the clock, now.lua) is written once.
#
# Included by the top-level CMakeLists.txt, which calls
# ratekeeper_generate_lua(<source dir> <output header>) when it configures;
# the .lua files are configure dependencies, so a build re-runs it when one
# changes. Also a script of its own, for a build without CMake's project:
#   cmake -DRK_LUA_DIR=lua -DRK_LUA_OUT=<dir>/ratekeeper/redis/lua_scripts.hpp \
#         -P cmake/ratekeeper_lua.cmake

# name = parts, in order
set(RATEKEEPER_LUA_SCRIPTS
  "kScript=arith.lua,fields.lua,now.lua,limits.lua"
  "kTokenBucketScript=now.lua,token_bucket.lua"
  # Issue 17: RedisPermits (a sorted set of holders per key).
  "kPermitsScript=now.lua,permits.lua")

function(ratekeeper_generate_lua lua_dir out)
  set(body "")
  set(sources "")
  foreach (entry IN LISTS RATEKEEPER_LUA_SCRIPTS)
    string(REPLACE "=" ";" pair "${entry}")
    list(GET pair 0 name)
    list(GET pair 1 parts)
    string(REPLACE "," ";" parts "${parts}")
    set(text "")
    foreach (part IN LISTS parts)
      set(file ${lua_dir}/${part})
      if (NOT EXISTS ${file})
        message(FATAL_ERROR "ratekeeper: Lua source ${file} is missing")
      endif()
      file(READ ${file} part_text)
      if (part_text MATCHES "\\)rk_lua\"")
        message(FATAL_ERROR "ratekeeper: ${file} holds the delimiter )rk_lua\"")
      endif()
      string(APPEND text "-- ${part}\n${part_text}")
      list(APPEND sources ${file})
    endforeach()
    string(APPEND body
      "inline constexpr char ${name}[] = R\"rk_lua(\n${text})rk_lua\";\n\n")
  endforeach()
  set(header
"// ratekeeper/redis/lua_scripts.hpp: generated from lua/*.lua by
// cmake/ratekeeper_lua.cmake; edit those, not this.
#ifndef RATEKEEPER_REDIS_LUA_SCRIPTS_HPP_
#define RATEKEEPER_REDIS_LUA_SCRIPTS_HPP_

namespace ratekeeper::detail::lua {

${body}}  // namespace ratekeeper::detail::lua

#endif  // RATEKEEPER_REDIS_LUA_SCRIPTS_HPP_
")
  # Written only when it changes, so a reconfigure rebuilds nothing.
  file(WRITE ${out}.tmp "${header}")
  file(COPY_FILE ${out}.tmp ${out} ONLY_IF_DIFFERENT)
  file(REMOVE ${out}.tmp)
  if (NOT CMAKE_SCRIPT_MODE_FILE)
    list(REMOVE_DUPLICATES sources)
    set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${sources})
  endif()
endfunction()

if (CMAKE_SCRIPT_MODE_FILE)
  if (NOT RK_LUA_DIR OR NOT RK_LUA_OUT)
    message(FATAL_ERROR "usage: cmake -DRK_LUA_DIR=<lua dir> "
                        "-DRK_LUA_OUT=<header> -P ratekeeper_lua.cmake")
  endif()
  ratekeeper_generate_lua(${RK_LUA_DIR} ${RK_LUA_OUT})
endif()
